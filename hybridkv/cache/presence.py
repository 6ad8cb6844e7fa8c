"""``Presence``: the one rule for "is this chunk's file still there?".

The index says what this engine believes is on disk; other engines sharing the
directory (and ``hybridkv gc``, and an operator) change the disk behind its back.
Every disk observation made to answer a lookup is trusted for one time-to-live,
``ttl`` (the ``refresh_interval`` setting), and then made again:

- a key the index lacks (a miss) is looked for on disk at most once per ``ttl``
  per key: that finds what another engine stored (``look_for``);
- a key restored from the index snapshot is checked once, header and stat against
  its record, before its first HIT (``recheck``);
- where files can vanish behind the index's back (``stored_can_vanish``: the fleet,
  whose lease holder deletes other engines' chunks), a stored key's file is stat'ed
  before a HIT at most once per ``ttl`` (``confirm``).

Invariants:
- ``look_for``, ``confirm`` and ``recheck`` never change the index: they report what the disk says
  and the caller (``CacheService``) acts on it.
- An observation is never trusted for longer than ``ttl`` seconds of ``clock``;
  with ``ttl == 0`` every stored HIT that must be confirmed stats again, and misses
  are never looked for (refresh off).
- Memory is bounded: each table is cleared when it passes ``MAX_REMEMBERED`` keys
  (a cleared table only costs extra stats).
- ``look_due`` and ``confirm_due`` read the tables only (no I/O): they tell a caller
  that must not block whether ``look_for`` / ``confirm`` would touch the disk.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable

from hybridkv.chunks import ChunkRecord
from hybridkv.store.chunk_store import ChunkStore
from hybridkv.store.format import ChunkError
from hybridkv.store.snapshot import recheck

__all__ = ["Presence", "Verdict", "MAX_REMEMBERED"]

#: keys each table remembers before it starts over
MAX_REMEMBERED = 1_000_000


class Verdict(enum.Enum):
    """What ``Presence.recheck`` found for a key restored from the snapshot."""

    PRESENT = "present"  # the file is as indexed
    CHANGED = "changed"  # rewritten since the snapshot: index ``record``
    RESTORED_GONE = "restored_gone"  # gone or unusable


class Presence:
    def __init__(self, store: ChunkStore, ttl: float, *, stored_can_vanish: bool,
                 clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.ttl = ttl
        self.stored_can_vanish = stored_can_vanish
        self.clock = clock
        #: restored from the snapshot, not yet compared with their files
        self.unchecked: set[bytes] = set()
        self._absent: dict[bytes, float] = {}  # key -> when the disk last had no file for it
        self._present: dict[bytes, float] = {}  # key -> when a stat last found its file

    def look_for(self, key: bytes, *, now_or_never: bool = False) -> ChunkRecord | None:
        """A miss: the record of ``key``'s file if another engine wrote it, else None.

        Looks at most once per ``ttl`` per key (``now_or_never``: look now, as a store's
        dedup does once it saw the file exist). Never looks when ``ttl <= 0``.
        """
        if self.ttl <= 0:
            return None
        now = self.clock()
        if not now_or_never:
            last = self._absent.get(key)
            if last is not None and now - last < self.ttl:
                return None
        _remember(self._absent, key, now)
        try:
            record = self.store.describe(key)
        except (OSError, ChunkError, ValueError):
            return None
        self._absent.pop(key, None)
        return record

    def look_due(self, key: bytes) -> bool:
        """Would ``look_for(key)`` look at the disk now? (No I/O.)"""
        if self.ttl <= 0:
            return False
        last = self._absent.get(key)
        return last is None or self.clock() - last >= self.ttl

    def confirm_due(self, key: bytes) -> bool:
        """Would ``confirm(key)`` stat the file now? (No I/O.)"""
        last = self._present.get(key)
        return last is None or self.clock() - last >= self.ttl

    def recheck(self, key: bytes, size: int, mtime_ns: int, position: int,
                parent: bytes | None) -> tuple[Verdict, ChunkRecord | None]:
        """The first HIT of a key in ``unchecked``, indexed with these facts: is its file
        what the snapshot said? ``(CHANGED, record)``: index ``record`` instead."""
        self.unchecked.discard(key)
        same, record = recheck(self.store, key, size, mtime_ns, position=position,
                               parent=parent)
        if same:
            return Verdict.PRESENT, None
        return (Verdict.CHANGED, record) if record is not None else (Verdict.RESTORED_GONE, None)

    def confirm(self, key: bytes) -> bool:
        """A stored key about to HIT where files can vanish: False if its file is gone
        (one stat, trusted for ``ttl``; a stat that cannot tell answers True)."""
        now = self.clock()
        last = self._present.get(key)
        if last is not None and now - last < self.ttl:
            return True
        try:
            self.store.path(key).stat()
        except FileNotFoundError:
            self._present.pop(key, None)
            return False
        except OSError:
            return True  # cannot tell: a load that fails is recomputed
        _remember(self._present, key, now)
        return True

    def forget(self, keys: Iterable[bytes]) -> None:
        """``keys`` left the index (their files deleted or gone): drop what was observed."""
        for key in keys:
            self._present.pop(key, None)
            self.unchecked.discard(key)


def _remember(table: dict[bytes, float], key: bytes, now: float) -> None:
    if len(table) > MAX_REMEMBERED:
        table.clear()
    table[key] = now
