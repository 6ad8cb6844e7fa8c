"""Page copies between CUDA KV tensors and pinned host buffers.

Per chunk, on the calling I/O thread's own CUDA stream:
- gather: wait for the engine's stream (an event recorded when the job was
  submitted), one ``index_select`` per layer (8-byte elements where the page
  allows: ``wide_view``) into a device staging buffer
  (layer-major, the file's byte order), ONE device-to-host copy of the whole
  payload into the pinned buffer, record an event; the thread waits on that
  event only before it hands the host bytes to the file write.
- scatter: ONE host-to-device copy of the verified payload into the staging
  buffer, one ``index_copy_`` per layer into the KV tensors, record an event,
  and wait on it before the pinned buffer goes back to the pool.
Several I/O threads run at once, so one chunk's file I/O overlaps another's
device copies.

Invariants:
- No ``torch.cuda.synchronize`` / stream synchronize: only per-chunk events.
- No host allocation per chunk (pinned buffers are allocated with the copier); one device
  staging buffer per I/O thread, allocated once (``staging_allocations``).
- ``scatter`` is only called with verified bytes (the caller's contract); it
  checks block ids, rows and sizes before the first device copy.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from hybridkv.pages.copier import PageCopier, wide_view

__all__ = ["CudaPageCopier"]


class _ThreadState:
    def __init__(self, device: torch.device, nbytes: int):
        self.stream = torch.cuda.Stream(device=device)
        self.done = torch.cuda.Event()
        with torch.cuda.stream(self.stream):
            self.staging = torch.empty(nbytes, dtype=torch.uint8, device=device)


class CudaPageCopier(PageCopier):
    is_cuda = True

    def __init__(self, tensors, groups, *, buffer_bytes: int, buffers: int, max_blocks: int):
        super().__init__(tensors, groups, buffer_bytes=buffer_bytes, buffers=buffers,
                         max_blocks=max_blocks)
        self.device = self.tensors[0].device
        self.pool.fill()
        self._local = threading.local()
        self._lock = threading.Lock()
        self.staging_allocations = 0
        self.events_waited = 0

    def _state(self) -> _ThreadState:
        state = getattr(self._local, "state", None)
        if state is None:
            state = _ThreadState(self.device, self.pool.nbytes)
            self._local.state = state
            with self._lock:
                self.staging_allocations += 1
        return state

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    @contextmanager
    def _drained(self, state: _ThreadState) -> Iterator[None]:
        """Record an event after the copies the block enqueued and wait on it, also when
        the block raised: the host buffer goes back to the pool only after its copies."""
        try:
            yield
        finally:
            state.done.record(state.stream)
            state.done.synchronize()
            with self._lock:
                self.events_waited += 1

    def gather(self, group_pos, block_ids, buf, after=None):
        n = len(block_ids)
        total = self._check(group_pos, n, buf, block_ids)
        state = self._state()
        buf.index[:n].copy_(torch.as_tensor(block_ids, dtype=torch.int64))
        with torch.cuda.stream(state.stream), self._drained(state):
            if after is not None:
                state.stream.wait_event(after)
            index = buf.index[:n].to(self.device, non_blocking=True)
            offset = 0
            for t, page in self.groups[group_pos]:
                kv, _ = wide_view(self.tensors[t], page, offset)
                dst = state.staging[offset:offset + n * page].view(kv.dtype).view(n, -1)
                torch.index_select(kv, 0, index, out=dst)
                offset += n * page
            buf.data[:total].copy_(state.staging[:total], non_blocking=True)
        return buf.array[:total]

    def scatter(self, group_pos, block_ids, payload, count, rows, buf, after=None):
        n = len(block_ids)
        total = self._check(group_pos, count, buf, block_ids, rows)
        if payload.numel() != total or payload.is_cuda:
            raise ValueError(f"payload of {payload.numel()} bytes, expected {total} on the host")
        state = self._state()
        identity = list(rows) == list(range(count))
        buf.index[:n].copy_(torch.as_tensor(block_ids, dtype=torch.int64))
        if not identity:
            buf.index[n:2 * n].copy_(torch.as_tensor(rows, dtype=torch.int64))
        with torch.cuda.stream(state.stream), self._drained(state):
            if after is not None:
                state.stream.wait_event(after)
            state.staging[:total].copy_(payload, non_blocking=True)
            index = buf.index[:2 * n if not identity else n].to(self.device, non_blocking=True)
            pick = None if identity else index[n:2 * n]
            offset = 0
            for t, page in self.groups[group_pos]:
                kv, _ = wide_view(self.tensors[t], page, offset)
                src = state.staging[offset:offset + count * page].view(kv.dtype).view(count, -1)
                if pick is not None:
                    src = src.index_select(0, pick)
                kv.index_copy_(0, index[:n], src)
                offset += count * page
