"""Writing a store's index snapshot periodically, off the caller's thread.

Invariants:
- At most one write runs at a time; the records are taken by the caller, on
  its own thread (the index is not thread-safe), only when ``due()``.
- A failed write is logged and counted (``failed``), never raised: the
  snapshot only saves time at the next start.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from hybridkv.chunks import ChunkRecord
from hybridkv.store.chunk_store import ChunkStore
from hybridkv.store.snapshot.codec import write_snapshot

__all__ = ["SnapshotWriter"]

log = logging.getLogger(__name__)


class SnapshotWriter:
    """Writes one store's snapshot every ``interval`` seconds, in a background thread."""

    def __init__(self, store: ChunkStore, interval: float, *,
                 clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.interval = interval
        self._clock = clock
        self._last = clock()
        self._thread: threading.Thread | None = None
        self.written = 0
        self.failed = 0

    def due(self) -> bool:
        return (self._clock() - self._last >= self.interval
                and (self._thread is None or not self._thread.is_alive()))

    def start(self, records: list[ChunkRecord]) -> None:
        """Write ``records`` in the background (call when ``due()``)."""
        self._last = self._clock()
        self._thread = threading.Thread(target=self._write, args=(records,),
                                        name="hybridkv-snapshot", daemon=True)
        self._thread.start()

    def write(self, records: Iterable[ChunkRecord]) -> bool:
        """Write now (after any background write); True on success."""
        self.wait()
        self._last = self._clock()
        return self._write(list(records))

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _write(self, records: list[ChunkRecord]) -> bool:
        started = time.monotonic()
        try:
            nbytes = write_snapshot(self.store, records)
        except Exception as exc:  # noqa: BLE001 - an optimisation must not stop the engine
            self.failed += 1
            log.warning("hybridkv: cannot write index snapshot %s: %s",
                        self.store.paths.snapshot(), exc)
            return False
        self.written += 1
        log.debug("hybridkv: index snapshot of %d chunks (%d bytes) written in %.2fs",
                  len(records), nbytes, time.monotonic() - started)
        return True
