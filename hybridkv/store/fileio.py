"""The only place hybridkv touches file contents: atomic writes and whole-file reads.

Tests swap in a subclass to inject faults (ENOSPC, EIO, short reads) without
a special filesystem.

Invariants:
- ``write_atomic`` makes ``path`` appear complete or not at all: the bytes go
  to a unique temp file in the same directory, optionally fsynced, then are
  renamed over ``path``; on any error the temp file is removed and the error
  re-raised.
- ``durability="full"`` also fsyncs the directory so the rename (or link) survives a
  power loss.
- ``io_mode="direct"`` opens with O_DIRECT exactly when the buffers allow it
  (page-aligned buffers of whole pages to write; a page-aligned buffer
  with room for the file rounded up to a page to read); otherwise, and for good
  once a filesystem answers EINVAL (tmpfs, overlayfs, some NFS), it uses
  buffered I/O and logs that once. The bytes on disk are the same either way.
- Every byte hybridkv reads or writes goes through a ``FileIO``: chunks, the
  snapshot, ``layout.json``, the fleet's lease, usage and state files, the stats
  files (``hybridkv.stats``) and the integrity key file. Not file contents, so not
  here: renames that move a file aside (quarantine, a stale lease) and the O_DIRECT
  probe ``direct.direct_supported``, which asks the filesystem itself (a ``FileIO``
  would fall back to buffered I/O and hide the answer).

Extension points (no-ops here; ``hybridkv.testing.faults.FaultyFileIO``
overrides them to inject faults, and nothing in ``FileIO`` asks whether they are
overridden):
- ``before_read(op, path)`` runs before every read of file contents; ``op`` is
  ``"read"`` (``read_into``, ``read_all``) or ``"read_prefix"``; ``path`` is the
  caller's, a ``str`` or a ``Path``.
- ``before_write(path, fd, size)`` runs once per write, when the temp file of
  ``path`` is open as ``fd`` and before its ``size`` bytes are written; the
  writes that follow use absolute offsets from 0 (they extend whatever the hook
  left). If it raises, the temp file is removed and the error re-raised.
- ``makedirs(path)`` creates every directory hybridkv creates.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from hybridkv.store.direct import O_DIRECT, align_up, is_aligned
from hybridkv.store.file_map import temp_path

__all__ = ["Durability", "FileIO", "IO_MODE_CHOICES"]

log = logging.getLogger(__name__)

Durability = Literal["none", "data", "full"]
DURABILITY_CHOICES: tuple[str, ...] = ("none", "data", "full")
IO_MODE_CHOICES: tuple[str, ...] = ("buffered", "direct")
_IOV_MAX = 1024


class FileIO:
    def __init__(self, durability: Durability = "none", file_mode: int = 0o600,
                 dir_mode: int = 0o700, io_mode: str = "buffered"):
        if durability not in DURABILITY_CHOICES:
            raise ValueError(f"durability must be one of {DURABILITY_CHOICES}, got {durability!r}")
        self.durability = durability
        self.file_mode = file_mode
        self.dir_mode = dir_mode
        self.io_mode = io_mode
        self.direct_refused = False  # a filesystem answered EINVAL to O_DIRECT

    @property
    def io_mode(self) -> str:
        return self._io_mode

    @io_mode.setter
    def io_mode(self, mode: str) -> None:
        if mode not in IO_MODE_CHOICES:
            raise ValueError(f"io_mode must be one of {IO_MODE_CHOICES}, got {mode!r}")
        self._io_mode = mode

    @property
    def direct(self) -> bool:
        """Whether O_DIRECT is attempted at all."""
        return self._io_mode == "direct" and bool(O_DIRECT) and not self.direct_refused

    def _refuse_direct(self, path: Path, exc: OSError) -> None:
        if not self.direct_refused:
            self.direct_refused = True
            log.warning("hybridkv: io_mode='direct' but the filesystem of %s refuses O_DIRECT "
                        "(%s); using buffered I/O", path.parent, exc.strerror)

    def makedirs(self, path: Path) -> None:
        os.makedirs(path, mode=self.dir_mode, exist_ok=True)

    # ------------------------------------------------------------------ extension points
    def before_read(self, op: str, path: str | os.PathLike) -> None:
        """Runs before every read of file contents (see the module docstring)."""

    def before_write(self, path: Path, fd: int, size: int) -> None:
        """Runs when ``path``'s temp file is open, before its bytes are written."""

    # ------------------------------------------------------------------ writes
    def write_atomic(self, path: Path, data: bytes | memoryview | Sequence[memoryview]) -> None:
        """Write ``data`` (one buffer, or buffers in order) to ``path`` atomically."""
        self._write_whole(path, data, replace=True)

    def write_new(self, path: Path, data: bytes | memoryview) -> None:
        """Create ``path`` with ``data``, atomically and only if it does not exist:
        FileExistsError when it does (``link``, which works on NFS)."""
        self._write_whole(path, data, replace=False)

    def check_writable(self, directory: Path) -> None:
        """OSError unless an (empty) file can be created in ``directory`` (created)."""
        self.makedirs(directory)
        self._atomic(Path(directory) / "probe", lambda fd: None, False, 0, replace=None)

    def _write_whole(self, path: Path, data, *, replace: bool) -> None:
        bufs = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
        views = [memoryview(b).cast("B") for b in bufs]
        direct = self.direct and all(is_aligned(v) for v in views)

        def write(fd: int) -> None:
            if len(views) == 1:
                self._write_all(fd, views[0])
            else:
                self._write_buffers(fd, views)

        size = sum(v.nbytes for v in views)
        if not self._atomic(path, write, direct, size, replace=replace):
            self._write_whole(path, data, replace=replace)  # O_DIRECT refused: buffered

    def write_streamed(self, path: Path, head_len: int, payload: Sequence[memoryview],
                       before_piece, make_head, slice_bytes: int) -> None:
        """Atomically write ``make_head()`` (``head_len`` bytes) then ``payload``, buffered.

        The payload goes first, at offset ``head_len``, in ``slice_bytes`` pieces;
        ``before_piece(piece)`` sees each piece right before it is written (so it can be
        hashed while in cache), and ``make_head()`` runs after the last one.
        """
        def write(fd: int) -> None:
            offset = head_len
            for view in payload:
                for lo in range(0, view.nbytes, slice_bytes):
                    piece = view[lo:lo + slice_bytes]
                    before_piece(piece)
                    self._pwrite_all(fd, piece, offset)
                    offset += piece.nbytes
            head = memoryview(make_head()).cast("B")
            if len(head) != head_len:
                raise ValueError(f"head is {len(head)} bytes, {head_len} were reserved")
            self._pwrite_all(fd, head, 0)

        self._atomic(path, write, False, head_len + sum(v.nbytes for v in payload))

    def _atomic(self, path: Path, write, direct: bool, size: int,
                replace: bool | None = True) -> bool:
        """Temp file, ``before_write``, ``write(fd)``, optional fsync, then rename over
        ``path`` (``replace``), link to it (``replace=False``: FileExistsError if it
        exists) or nothing (None: a probe). False (nothing left behind) when O_DIRECT
        was refused with EINVAL, so the caller retries buffered."""
        tmp = temp_path(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | (O_DIRECT if direct else 0)
        try:
            fd = os.open(tmp, flags, self.file_mode)
        except FileNotFoundError:
            self.makedirs(path.parent)
            fd = os.open(tmp, flags, self.file_mode)
        except OSError as exc:
            if not direct or exc.errno != errno.EINVAL:
                raise
            self._refuse_direct(path, exc)
            return False
        try:
            try:
                self.before_write(path, fd, size)
                write(fd)
                if self.durability != "none":
                    os.fsync(fd)
            finally:
                os.close(fd)
            if replace:
                os.replace(tmp, path)
            elif replace is not None:
                os.link(tmp, path)  # atomic; FileExistsError if the file exists
        except BaseException as exc:
            _unlink(tmp)
            if direct and isinstance(exc, OSError) and exc.errno == errno.EINVAL:
                self._refuse_direct(path, exc)
                return False
            raise
        if not replace:
            _unlink(tmp)  # linked, or a probe: the temp name goes
        if self.durability == "full" and replace is not None:
            self.fsync_dir(path.parent)
        return True

    def _pwrite_all(self, fd: int, view: memoryview, offset: int) -> None:
        while view:
            n = os.pwrite(fd, view, offset)
            offset += n
            view = view[n:]

    def _write_all(self, fd: int, view: memoryview) -> None:
        view = view.cast("B")
        while view:
            n = os.write(fd, view)
            if n <= 0:  # pragma: no cover - os.write raises instead
                raise OSError("short write")
            view = view[n:]

    def _write_buffers(self, fd: int, views: list[memoryview]) -> None:
        """Write ``views`` in order with as few ``pwritev`` calls as the kernel allows."""
        offset = 0
        while views:
            n = os.pwritev(fd, views[:_IOV_MAX], offset)
            offset += n
            while views and n >= len(views[0]):
                n -= len(views[0])
                views = views[1:]
            if n:
                views[0] = views[0][n:]

    def fsync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def read_into(self, path: Path, buf: memoryview, consume=None,
                  slice_bytes: int = 0) -> tuple[int, int]:
        """Read the whole file at ``path`` into the start of ``buf`` (flat bytes).

        Returns ``(file size, bytes read)``: nothing is read when the file does not
        fit; fewer bytes than the size only if the file changed while being read.
        Raises FileNotFoundError when it is gone, OSError on I/O errors.
        ``consume(n)``, when given, is called each time ``buf[:n]`` has grown; buffered
        reads then go in ``slice_bytes`` pieces, so the consumer sees them in cache.
        O_DIRECT reads stay one request (device queue depth matters more there).
        """
        self.before_read("read", path)
        direct = self.direct and len(buf) % 4096 == 0 and is_aligned(buf[:4096])
        try:
            fd = os.open(path, os.O_RDONLY | (O_DIRECT if direct else 0))
        except OSError as exc:
            if not direct or exc.errno != errno.EINVAL:
                raise
            self._refuse_direct(Path(path), exc)
            direct = False
            fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size > len(buf):
                return size, 0
            want = min(align_up(size), len(buf)) if direct else size
            got = 0
            while got < size:
                end = want if direct or not slice_bytes else min(want, got + slice_bytes)
                try:
                    n = os.preadv(fd, [buf[got:end]], got)
                except OSError as exc:
                    if not direct or exc.errno != errno.EINVAL:
                        raise
                    self._refuse_direct(Path(path), exc)
                    os.close(fd)
                    fd = os.open(path, os.O_RDONLY)
                    direct, want = False, size
                    continue
                if n <= 0:
                    break
                got += n
                if consume is not None:
                    consume(min(got, size))
            return size, min(got, size)
        finally:
            os.close(fd)

    def read_all(self, path: Path) -> bytes:
        """The whole file. Raises FileNotFoundError when it is gone."""
        self.before_read("read", path)
        with open(path, "rb", buffering=0) as f:
            return f.read()

    def read_prefix(self, path: Path, size: int) -> bytes:
        """The first ``size`` bytes of the file (fewer if it is shorter)."""
        self.before_read("read_prefix", path)
        with open(path, "rb", buffering=0) as f:
            return f.read(size)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
