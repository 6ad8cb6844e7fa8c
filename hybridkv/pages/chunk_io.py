"""One chunk between the KV cache and its file: gather -> write, verified read -> scatter.

Both directions hold one pooled host buffer for the whole chunk. Loads read the
file into that buffer with ``ChunkStore.read_into`` when the store has it (the
verified arrays are views into the buffer), else with ``ChunkStore.read`` plus
one copy into the buffer.

Invariants:
- ``load_chunk`` copies nothing into the KV tensors unless the file verified
  (header + checksum, by the store), holds every block the load needs and has
  the engine's page sizes; otherwise it raises a ``ChunkError`` (or
  ValueError) and the KV tensors are untouched.
- ``store_chunk`` writes the pages of exactly the listed blocks, in block order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from hybridkv.keys import key_group
from hybridkv.pages.copier import PageCopier, layer_arrays
from hybridkv.pages.pool import HostBuffer
from hybridkv.store.chunk_store import ChunkStore
from hybridkv.store.format import ChunkError, ChunkHeader, ChunkMissing

__all__ = ["store_chunk", "load_chunk", "host_buffer_bytes", "READ_SLACK_BYTES"]

#: room for a chunk file's header when the store cannot say its largest file size
READ_SLACK_BYTES = 1 << 20

#: (index within the chunk, engine block id) per block, in block order
Blocks = Sequence[tuple[int, int]]


def host_buffer_bytes(store: ChunkStore, copier_pages: Sequence[Sequence[int]],
                      group_ids: Sequence[int], blocks_per_chunk: int) -> int:
    """Bytes one host buffer needs for any chunk of these groups (payload or whole file)."""
    need = 1
    max_file = getattr(store, "max_file_bytes", None)
    for pages, group_id in zip(copier_pages, group_ids):
        payload = blocks_per_chunk * sum(pages)
        file_bytes = (int(max_file(group_id)) if max_file is not None
                      else payload + READ_SLACK_BYTES)
        need = max(need, payload, file_bytes)
    return need


def _read(store: ChunkStore, key: bytes, buf: HostBuffer) -> tuple[ChunkHeader, list[np.ndarray]]:
    read_into = getattr(store, "read_into", None)
    if read_into is not None:
        return read_into(key, buf.array)
    return store.read(key)


def _payload(buf: HostBuffer, arrays: Sequence[np.ndarray], total: int) -> torch.Tensor:
    """The arrays' bytes as one layer-major uint8 slice of ``buf``."""
    if total > buf.data.numel():
        raise ValueError(f"chunk payload of {total} bytes exceeds the host buffer "
                         f"({buf.data.numel()} bytes)")
    base = buf.array.ctypes.data
    end = base + buf.data.numel()
    addrs = [a.ctypes.data for a in arrays]
    inside = [base <= x < end for x in addrs]
    if arrays and all(inside) and all(a.flags.c_contiguous for a in arrays):
        start = addrs[0] - base
        if all(x - base == start + sum(b.nbytes for b in arrays[:i])
               for i, x in enumerate(addrs)):
            return buf.data[start:start + total]
    if any(inside):  # views into buf, not back to back: copying in place could overlap
        arrays = [np.concatenate([a.reshape(-1) for a in arrays])]
    out, offset = buf.array, 0
    for a in arrays:
        out[offset:offset + a.nbytes] = a.reshape(-1)
        offset += a.nbytes
    return buf.data[:total]


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
               blocks: Blocks, after: object | None = None) -> int:
    """Copy the verified pages of chunk ``key`` into ``blocks``. Returns payload bytes."""
    if not blocks:
        raise ValueError(f"load of chunk {key.hex()[:16]} lists no blocks")
    with copier.pool.take() as buf:
        header, arrays = _read(store, key, buf)
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
    return total
