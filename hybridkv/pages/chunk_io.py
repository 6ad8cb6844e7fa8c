"""One chunk between the KV cache and its file: gather -> write, verified read -> scatter.

Both directions hold one pooled host buffer for the whole chunk. Loads read the
file into that buffer with ``ChunkStore.read_into``: the verified arrays are
views into the buffer, back to back, so the payload goes to the KV cache from
there without another copy.

Invariants:
- ``load_chunk`` copies nothing into the KV tensors unless the file verified
  (header + checksum, by the store), holds every block the load needs and has
  the engine's page sizes; otherwise it raises a ``ChunkError`` (or
  ValueError) and the KV tensors are untouched.
- ``store_chunk`` writes the pages of exactly the listed blocks, in block order.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from hybridkv.keys import key_group
from hybridkv.pages.copier import PageCopier, layer_arrays
from hybridkv.pages.pool import HostBuffer
from hybridkv.store.chunk_store import ChunkStore
from hybridkv.store.format import ChunkError, ChunkMissing

__all__ = ["store_chunk", "load_chunk", "host_buffer_bytes"]

#: (index within the chunk, engine block id) per block, in block order
Blocks = Sequence[tuple[int, int]]


def host_buffer_bytes(store: ChunkStore, copier_pages: Sequence[Sequence[int]],
                      group_ids: Sequence[int], blocks_per_chunk: int) -> int:
    """Bytes one host buffer needs for any chunk of these groups (payload or whole file)."""
    need = 1
    for pages, group_id in zip(copier_pages, group_ids):
        need = max(need, blocks_per_chunk * sum(pages), int(store.max_file_bytes(group_id)))
    return need


def _payload(buf: HostBuffer, arrays: Sequence[np.ndarray], total: int) -> torch.Tensor:
    """The verified arrays' bytes as one slice of ``buf``: ``read_into`` returns them as
    views into ``buf``, back to back in layer order (``format.verify`` refuses any other
    table), so the slice is the payload itself."""
    start = arrays[0].ctypes.data - buf.array.ctypes.data if arrays else 0
    offsets = [a.ctypes.data - buf.array.ctypes.data for a in arrays]
    expected = [start + sum(a.nbytes for a in arrays[:i]) for i in range(len(arrays))]
    if offsets != expected or not 0 <= start <= start + total <= buf.data.numel():
        raise ValueError("verified chunk arrays are not back to back in the host buffer")
    return buf.data[start:start + total]


def store_chunk(copier: PageCopier, store: ChunkStore, key: bytes, *, group_pos: int,
                blocks: Blocks, position: int, parent: bytes | None,
                after: object | None = None) -> int:
    """Write the pages of ``blocks`` as chunk ``key``. Returns bytes written (0: existed)."""
    ids = [b for _, b in blocks]
    with copier.pool.take() as buf:
        payload = copier.gather(group_pos, ids, buf, after)
        arrays = layer_arrays(payload, len(ids), copier.pages(group_pos))
        return store.write(key, position=position, block_offset=blocks[0][0], arrays=arrays,
                           parent=parent)


def load_chunk(copier: PageCopier, store: ChunkStore, key: bytes, *, group_pos: int,
               blocks: Blocks, after: object | None = None,
               phases: dict[str, float] | None = None) -> int:
    """Copy the verified pages of chunk ``key`` into ``blocks``. Returns payload bytes.

    ``phases``, if given, gains the seconds spent reading (and verifying) and copying."""
    if not blocks:
        raise ValueError(f"load of chunk {key.hex()[:16]} lists no blocks")
    with copier.pool.take() as buf:
        t0 = time.perf_counter()
        header, arrays = store.read_into(key, buf.array)
        t1 = time.perf_counter()
        if header.group != key_group(key):  # the store checks it too; never trust one place
            raise ChunkError(f"chunk {key.hex()[:16]} holds group {header.group}")
        first, count = header.block_offset, header.num_blocks
        rows = [idx - first for idx, _ in blocks]
        if any(not 0 <= r < count for r in rows):
            raise ChunkMissing(f"chunk holds blocks {first}..{first + count - 1}, "
                               f"load needs {[i for i, _ in blocks]}")
        expected = copier.pages(group_pos)
        if list(header.page_bytes) != expected:
            raise ChunkError(f"page sizes {list(header.page_bytes)} != engine's {expected}")
        total = header.payload_bytes
        payload = _payload(buf, arrays, total)
        copier.scatter(group_pos, [b for _, b in blocks], payload, count, rows, buf, after)
        if phases is not None:
            phases["read"] = phases.get("read", 0.0) + t1 - t0
            phases["copy"] = phases.get("copy", 0.0) + time.perf_counter() - t1
    return total
