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
           "is_aligned"]

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


class StagingBuffers:
    """One growing aligned buffer per thread."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, nbytes: int) -> np.ndarray:
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.nbytes < nbytes:
            buf = self._local.buf = aligned_empty(align_up(max(nbytes, DIRECT_ALIGN)))
        return buf
