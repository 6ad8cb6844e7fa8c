"""A small hybrid KV cache (full, sliding, padded state) in torch tensors, for page-copy tests.

No vLLM: the GPU machine runs these tests without it.
"""

from __future__ import annotations

import numpy as np
import torch

from hybridkv.groups import GroupKind, GroupSpec, HybridLayout
from hybridkv.keys import make_key
from hybridkv.pages import host_buffer_bytes, make_copier
from hybridkv.store.chunk_store import ChunkStore

BLOCKS_PER_CHUNK = 4
NUM_BLOCKS = 64
PAGE = 96            # attention page bytes per layer per block
STATE_PAGE = 202     # un-padded state page (2-byte aligned only); its row is padded to ROW
ROW = 256


def layout() -> HybridLayout:
    return HybridLayout(model="pages-test", dtype="bfloat16", groups=(
        GroupSpec(index=0, kind=GroupKind.FULL, block_tokens=16, chunk_tokens=64,
                  layer_names=("l0", "l3"), page_bytes=PAGE),
        GroupSpec(index=1, kind=GroupKind.SLIDING, block_tokens=16, chunk_tokens=64,
                  layer_names=("l1", "l2"), page_bytes=PAGE, window_tokens=48),
        GroupSpec(index=2, kind=GroupKind.STATE, block_tokens=16, chunk_tokens=64,
                  layer_names=("m4", "m5"), page_bytes=STATE_PAGE),
    ))


# vLLM's hybrid allocator shares one tensor between layer i of every group; so do we:
# tensor 0 holds l0 and l1, tensor 1 l3 and l2 (full-width rows), tensors 2-3 the state
# layers (rows padded to ROW bytes)
GROUP_REFS = [[(0, PAGE), (1, PAGE)], [(0, PAGE), (1, PAGE)],
              [(2, STATE_PAGE), (3, STATE_PAGE)]]
GROUP_IDS = [0, 1, 2]


def kv_tensors(device: str | torch.device, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    widths = [PAGE, PAGE, ROW, ROW]
    return [torch.randint(-128, 128, (NUM_BLOCKS, w), dtype=torch.int8, generator=gen).to(device)
            for w in widths]


def make_store(root, **kw) -> ChunkStore:
    store = ChunkStore(root, layout(), **kw)
    store.ensure_dirs()
    return store


def copier_for(store: ChunkStore, tensors, *, buffers: int = 2):
    pages = [[p for _, p in refs] for refs in GROUP_REFS]
    return make_copier(tensors, GROUP_REFS,
                       buffer_bytes=host_buffer_bytes(store, pages, GROUP_IDS, BLOCKS_PER_CHUNK),
                       buffers=buffers, max_blocks=BLOCKS_PER_CHUNK)


def key(i: int, group: int) -> bytes:
    return make_key(i.to_bytes(16, "big"), group)


def pages_of(tensors, group_pos: int, block_ids) -> list[np.ndarray]:
    """Expected stored bytes: each layer's un-padded pages of ``block_ids``, as uint8."""
    out = []
    for t, page in GROUP_REFS[group_pos]:
        rows = tensors[t][list(block_ids), :page].cpu().numpy().view(np.uint8)
        out.append(rows)
    return out


def store_kinds(root) -> dict[str, ChunkStore]:
    """The stores to test loads with (named, for the assertion messages)."""
    return {"read_into": make_store(root / "a")}


# ---------------------------------------------------------------- checks shared by CPU and GPU tests
def _blocks(ids, first: int = 0):
    return [(first + i, b) for i, b in enumerate(ids)]


def _snapshot(tensors) -> list[torch.Tensor]:
    return [t.clone() for t in tensors]


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def check_round_trip(device, root, seed: int = 0) -> None:
    """Every group kind: KV -> file -> other KV blocks, bit-exact; the
    state rows' padding and every other block stay as they were."""
    from hybridkv.pages import load_chunk, store_chunk

    rng = np.random.default_rng(seed)
    for name, store in store_kinds(root).items():
        src = kv_tensors(device, seed)
        dst = kv_tensors(device, seed + 1)
        copier = copier_for(store, src)
        for pos, group in enumerate(GROUP_IDS):
            ids = rng.choice(NUM_BLOCKS, BLOCKS_PER_CHUNK, replace=False).tolist()
            k = key(seed * 100 + pos, group)
            written = store_chunk(copier, store, k, group_pos=pos, blocks=_blocks(ids),
                                  position=64, parent=None, after=copier.mark())
            assert written > 0
            header, arrays = store.read(k)
            want = pages_of(src, pos, ids)
            assert all(np.array_equal(a, w) for a, w in zip(arrays, want)), name

            load_copier = copier_for(store, dst)
            targets = rng.choice(NUM_BLOCKS, BLOCKS_PER_CHUNK, replace=False).tolist()
            before = _snapshot(dst)
            size = load_chunk(load_copier, store, k, group_pos=pos, blocks=_blocks(targets),
                              after=load_copier.mark())
            assert size == sum(w.nbytes for w in want)
            assert all(np.array_equal(g, w) for g, w in zip(pages_of(dst, pos, targets), want))
            # nothing else moved: other rows, and bytes past each page (state padding)
            for t, page in GROUP_REFS[pos]:
                mask = torch.ones(NUM_BLOCKS, dtype=torch.bool, device=dst[t].device)
                mask[targets] = False
                assert torch.equal(dst[t][mask], before[t][mask])
                assert torch.equal(dst[t][targets, page:], before[t][targets, page:])
            for t in {t for t, _ in GROUP_REFS[pos]} ^ set(range(len(dst))):
                assert torch.equal(dst[t], before[t])


def check_partial_chunks(device, root) -> None:
    """A file holding blocks 1..3 of its chunk serves any of them; block 0 is a miss."""
    from hybridkv.pages import load_chunk, store_chunk
    from hybridkv.store.format import ChunkMissing

    for store in store_kinds(root).values():
        src, dst = kv_tensors(device, 5), kv_tensors(device, 6)
        copier = copier_for(store, src)
        for pos, group in enumerate(GROUP_IDS):
            k = key(500 + pos, group)
            held = [7, 3, 40]
            store_chunk(copier, store, k, group_pos=pos, blocks=_blocks(held, first=1),
                        position=64, parent=key(499, group))
            header, _ = store.read(k)
            assert (header.block_offset, header.num_blocks) == (1, 3)
            # load chunk blocks 2 and 3 (file rows 1, 2) into blocks 9 and 1
            load_chunk(copier_for(store, dst), store, k, group_pos=pos,
                       blocks=[(2, 9), (3, 1)])
            want = pages_of(src, pos, [3, 40])
            assert all(np.array_equal(g, w) for g, w in zip(pages_of(dst, pos, [9, 1]), want))
            before = _snapshot(dst)
            try:
                load_chunk(copier_for(store, dst), store, k, group_pos=pos,
                           blocks=[(0, 11), (1, 12)])
            except ChunkMissing:
                pass
            else:
                raise AssertionError("a block the file does not hold was served")
            assert _same(dst, before)


def check_fail_closed(device, root) -> None:
    """A corrupt file, a file with other page sizes: an error, the KV tensors untouched,
    the corrupt file quarantined."""
    from hybridkv.pages import load_chunk, store_chunk
    from hybridkv.store.format import ChunkCorrupt, ChunkError

    for store in store_kinds(root).values():
        src, dst = kv_tensors(device, 7), kv_tensors(device, 8)
        copier, load_copier = copier_for(store, src), copier_for(store, dst)
        for pos, group in enumerate(GROUP_IDS):
            k = key(700 + pos, group)
            store_chunk(copier, store, k, group_pos=pos, blocks=_blocks([1, 2, 3, 4]),
                        position=64, parent=None)
            path = store.path(k)
            data = bytearray(path.read_bytes())
            data[-5] ^= 0x40  # one payload bit
            path.write_bytes(bytes(data))
            before = _snapshot(dst)
            try:
                load_chunk(load_copier, store, k, group_pos=pos, blocks=_blocks([5, 6, 7, 8]))
            except ChunkCorrupt:
                pass
            else:
                raise AssertionError("a corrupt chunk was loaded")
            assert _same(dst, before) and not path.exists()
            # a verified file whose pages are not the engine's
            k2 = key(750 + pos, group)
            rng = np.random.default_rng(pos)
            arrays = [rng.integers(0, 256, (4, page + 8), dtype=np.uint8)
                      for _, page in GROUP_REFS[pos]]
            store.write(k2, position=64, block_offset=0, arrays=arrays)
            try:
                load_chunk(load_copier, store, k2, group_pos=pos, blocks=_blocks([5, 6, 7, 8]))
            except ChunkError as exc:
                assert "page sizes" in str(exc)
            else:
                raise AssertionError("pages of another size were loaded")
            assert _same(dst, before)
