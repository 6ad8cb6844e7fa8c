"""A bounded pool of preallocated host buffers (pinned when copies go to a GPU).

Every page copy between the KV cache and a chunk file goes through one host
buffer, taken from this pool for the whole copy and given back afterwards.

Invariants:
- At most ``capacity`` buffers ever exist; ``allocations`` counts them, so after
  warm-up (or ``fill``) no copy allocates host memory. A taker waits while all
  are in use.
- A buffer is handed to one taker at a time; it returns to the pool only when
  the taker's ``with`` block ends (after any device copy touching it finished).
- Each buffer holds ``nbytes`` (rounded up to ``ALIGN``, page-aligned) of data plus ``index_slots`` int64 slots for the
  block ids (and rows) a copy sends to the device.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ALIGN", "HostBuffer", "HostBufferPool"]

#: buffers start on and span whole pages, so O_DIRECT reads can fill them
ALIGN = 4096


@dataclass(eq=False)
class HostBuffer:
    """One reusable host buffer: ``data`` (uint8) and ``index`` (int64), same pinning."""

    data: torch.Tensor
    index: torch.Tensor

    @property
    def array(self) -> np.ndarray:
        """``data`` as a writable numpy array (shares memory)."""
        return self.data.numpy()


class HostBufferPool:
    def __init__(self, nbytes: int, capacity: int, *, pin: bool, index_slots: int = 0):
        if nbytes <= 0 or capacity <= 0:
            raise ValueError(f"host buffers need positive size and count, got "
                             f"nbytes={nbytes} capacity={capacity}")
        self.nbytes = -(-int(nbytes) // ALIGN) * ALIGN
        self.capacity = int(capacity)
        self.pin = pin
        self.index_slots = max(1, int(index_slots))
        self.allocations = 0
        self.peak_in_use = 0
        self._free: list[HostBuffer] = []
        self._in_use = 0
        self._cond = threading.Condition()

    @property
    def in_use(self) -> int:
        return self._in_use

    def _allocate(self) -> HostBuffer:
        # neither allocator promises page alignment (torch's pinned caching allocator was
        # seen handing out a block 1536 bytes past a page): take a page more, start on one
        raw = torch.empty(self.nbytes + ALIGN, dtype=torch.uint8, pin_memory=self.pin)
        start = -raw.data_ptr() % ALIGN
        data = raw[start:start + self.nbytes]
        index = torch.empty(self.index_slots, dtype=torch.int64, pin_memory=self.pin)
        return HostBuffer(data, index)

    @contextmanager
    def take(self) -> Iterator[HostBuffer]:
        """A free buffer for the duration of the block (waits while all are in use)."""
        with self._cond:
            while not self._free and self.allocations >= self.capacity:
                self._cond.wait()
            if self._free:
                buf = self._free.pop()
            else:
                self.allocations += 1  # reserve the slot before allocating outside the lock
                buf = None
            self._in_use += 1
            self.peak_in_use = max(self.peak_in_use, self._in_use)
        try:
            if buf is None:
                try:
                    buf = self._allocate()
                except BaseException:
                    with self._cond:
                        self.allocations -= 1
                        self._in_use -= 1
                        self._cond.notify()
                    raise
            yield buf
        finally:
            if buf is not None:
                with self._cond:
                    self._free.append(buf)
                    self._in_use -= 1
                    self._cond.notify()

    def fill(self) -> None:
        """Allocate every buffer now (pinning is slow: keep it out of the first copies)."""
        with self._cond:
            missing = self.capacity - self.allocations
            self.allocations = self.capacity
        fresh = []
        try:
            for _ in range(missing):
                fresh.append(self._allocate())
        finally:
            with self._cond:
                self.allocations -= missing - len(fresh)
                self._free.extend(fresh)
                self._cond.notify_all()

    def clear(self) -> None:
        """Drop the idle buffers (the ones in use return as usual)."""
        with self._cond:
            self.allocations -= len(self._free)
            self._free.clear()
