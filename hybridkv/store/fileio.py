"""The only place hybridkv touches file contents: atomic writes and whole-file reads.

Tests swap in a subclass to inject faults (ENOSPC, EIO, short reads) without
a special filesystem.

Invariants:
- ``write_atomic`` makes ``path`` appear complete or not at all: the bytes go
  to a unique temp file in the same directory, optionally fsynced, then are
  renamed over ``path``; on any error the temp file is removed and the error
  re-raised.
- ``durability="full"`` also fsyncs the directory so the rename survives a
  power loss.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

__all__ = ["Durability", "FileIO", "tmp_name_prefix"]

Durability = Literal["none", "data", "full"]
DURABILITY_CHOICES: tuple[str, ...] = ("none", "data", "full")

_HOST = socket.gethostname().replace(".", "_")[:32]
_counter = 0
_counter_lock = threading.Lock()


def tmp_name_prefix() -> str:
    """``.<host>.<pid>.``: identifies the process that owns a temp file."""
    return f".{_HOST}.{os.getpid()}."


class FileIO:
    def __init__(self, durability: Durability = "none", file_mode: int = 0o600,
                 dir_mode: int = 0o700):
        if durability not in DURABILITY_CHOICES:
            raise ValueError(f"durability must be one of {DURABILITY_CHOICES}, got {durability!r}")
        self.durability = durability
        self.file_mode = file_mode
        self.dir_mode = dir_mode

    def makedirs(self, path: Path) -> None:
        os.makedirs(path, mode=self.dir_mode, exist_ok=True)

    def write_atomic(self, path: Path, data: bytes | memoryview | Sequence[memoryview]) -> None:
        """Write ``data`` (one buffer, or buffers in order) to ``path`` atomically."""
        global _counter
        with _counter_lock:
            _counter += 1
            n = _counter
        tmp = path.with_name(f"{tmp_name_prefix()}{n}.{path.name}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self.file_mode)
        except FileNotFoundError:
            self.makedirs(path.parent)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self.file_mode)
        try:
            try:
                for buf in ([data] if isinstance(data, (bytes, bytearray, memoryview)) else data):
                    self._write_all(fd, memoryview(buf))
                if self.durability != "none":
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        if self.durability == "full":
            self.fsync_dir(path.parent)

    def _write_all(self, fd: int, view: memoryview) -> None:
        view = view.cast("B")
        while view:
            n = os.write(fd, view)
            if n <= 0:  # pragma: no cover - os.write raises instead
                raise OSError("short write")
            view = view[n:]

    def fsync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def read_all(self, path: Path) -> bytes:
        """The whole file. Raises FileNotFoundError when it is gone."""
        with open(path, "rb", buffering=0) as f:
            return f.read()

    def read_prefix(self, path: Path, size: int) -> bytes:
        with open(path, "rb", buffering=0) as f:
            return f.read(size)
