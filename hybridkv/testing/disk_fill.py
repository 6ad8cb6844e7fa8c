"""Test aid: watch a filesystem's free space, and fill it the way another program would.

``FreeSpaceWatch`` samples ``statvfs`` in a thread every ``period`` seconds and keeps
the lowest free space seen (the floor test's figure). ``Filler`` writes a file beside
the cache until the filesystem is full; with ``keep=True`` a thread keeps it full
(it takes every byte hybridkv frees) until ``stop``, which deletes the file.

Invariant: both only read the free space or write their own file; neither touches
hybridkv's files.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

__all__ = ["Filler", "FreeSpaceWatch"]


def free_bytes(path: str | os.PathLike) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class FreeSpaceWatch:
    def __init__(self, path: str | os.PathLike, period: float = 0.01):
        self.path = os.fspath(path)
        st = os.statvfs(self.path)
        self.total = st.f_blocks * st.f_frsize
        self.lowest = free_bytes(self.path)
        self.samples = 0
        self._period = period
        self._pause = threading.Event()  # set: not sampling (the filler's own fill)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="hybridkv-free-space-watch")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            if self._pause.is_set():
                continue
            try:
                self.lowest = min(self.lowest, free_bytes(self.path))
                self.samples += 1
            except OSError:
                pass

    def pause(self, paused: bool) -> None:
        """Stop (True) or resume sampling: a deliberate fill is not hybridkv's doing."""
        (self._pause.set if paused else self._pause.clear)()

    def report(self) -> dict:
        return {"free": free_bytes(self.path), "total": self.total, "lowest": self.lowest,
                "samples": self.samples}

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class Filler:
    def __init__(self, path: str | os.PathLike, *, keep: bool = False, leave: int = 0,
                 period: float = 0.05):
        self.path = Path(path)
        self.leave = leave
        self.written = 0
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.fill()
        self._thread = None
        if keep:
            self._thread = threading.Thread(target=self._keep, args=(period,), daemon=True,
                                            name="hybridkv-filler")
            self._thread.start()

    def fill(self) -> int:
        """Write until ``leave`` bytes are free (ENOSPC ends it); returns bytes written."""
        added = 0
        with self._lock:
            while True:
                room = free_bytes(self.path.parent) - self.leave
                if room <= 0:
                    break
                try:
                    n = os.write(self._fd, b"\0" * min(room, 1 << 20))
                except OSError as exc:
                    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                        break
                    raise
                if n == 0:
                    break
                added += n
            self.written += added
        return added

    def _keep(self, period: float) -> None:
        while not self._stop.wait(period):
            self.fill()

    def stop(self) -> int:
        """Stop filling and delete the file; returns the bytes it held."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        os.close(self._fd)
        self.path.unlink()
        return self.written
