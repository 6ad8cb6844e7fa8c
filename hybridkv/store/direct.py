"""Page-aligned buffers for O_DIRECT (and reuse), and the alignment arithmetic.

Invariants:
- ``aligned_empty(n)`` is a writable, C-contiguous uint8 array of ``n`` bytes
  whose address is a multiple of ``DIRECT_ALIGN``.
- ``StagingBuffers.get(n)`` hands each thread its own aligned buffer of at
  least ``n`` bytes, reused across calls (grown, never shrunk): no allocation
  or page faults per chunk once warm.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from hybridkv.store.format import DIRECT_ALIGN

__all__ = ["DIRECT_ALIGN", "O_DIRECT", "StagingBuffers", "align_up", "aligned_empty",
           "direct_supported", "is_aligned"]

#: 0 where the platform has no O_DIRECT (direct mode then falls back to buffered)
O_DIRECT = getattr(os, "O_DIRECT", 0)


def align_up(n: int, align: int = DIRECT_ALIGN) -> int:
    return -(-n // align) * align


def aligned_empty(nbytes: int, align: int = DIRECT_ALIGN) -> np.ndarray:
    raw = np.empty(nbytes + align, dtype=np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + nbytes]


def is_aligned(view: memoryview | np.ndarray, align: int = DIRECT_ALIGN) -> bool:
    """Whether ``view`` (contiguous) starts on and spans whole ``align``-byte pages."""
    if view.nbytes % align:
        return False
    arr = np.frombuffer(view, dtype=np.uint8) if isinstance(view, memoryview) else view
    return arr.ctypes.data % align == 0


def direct_supported(directory: os.PathLike | str) -> bool:
    """Whether files in ``directory`` accept an O_DIRECT write (tmpfs and some overlay or
    network filesystems refuse it with EINVAL; ``FileIO`` then falls back to buffered)."""
    if not O_DIRECT:
        return False
    probe = os.path.join(directory, f".o_direct_probe.{os.getpid()}.{threading.get_ident()}")
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | O_DIRECT, 0o600)
        try:
            os.write(fd, aligned_empty(DIRECT_ALIGN))
        finally:
            os.close(fd)
        return True
    except OSError:
        return False
    finally:
        try:
            os.unlink(probe)
        except FileNotFoundError:
            pass


class StagingBuffers:
    """One growing aligned buffer per thread."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, nbytes: int) -> np.ndarray:
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.nbytes < nbytes:
            buf = self._local.buf = aligned_empty(align_up(max(nbytes, DIRECT_ALIGN)))
        return buf
