"""The CUDA page-copy path: pinned pool, one staging copy per chunk, events, fail-closed.

Marked ``gpu``: skipped where ``torch.cuda.is_available()`` is False (conftest). Imports
no vLLM (the GPU machine has none): ``scripts/device_check.sh`` runs this file there.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from hybridkv.pages import load_chunk, store_chunk
from pages_helpers import (
    BLOCKS_PER_CHUNK,
    GROUP_IDS,
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

pytestmark = pytest.mark.gpu


def test_round_trip_gpu_file_gpu_bit_exact(tmp_path):
    check_round_trip("cuda", tmp_path)


def test_partial_chunks(tmp_path):
    check_partial_chunks("cuda", tmp_path)


def test_corrupt_file_never_touches_the_gpu_tensor(tmp_path):
    check_fail_closed("cuda", tmp_path)


def test_cuda_copier_uses_pinned_pool(tmp_path):
    from hybridkv.pages.cuda import CudaPageCopier

    store = make_store(tmp_path)
    copier = copier_for(store, kv_tensors("cuda", 0))
    assert isinstance(copier, CudaPageCopier) and copier.pool.pin
    with copier.pool.take() as buf:
        assert buf.data.is_pinned() and buf.index.is_pinned()
        assert buf.data.data_ptr() % 4096 == 0


def _chunks(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        pos = i % len(GROUP_IDS)
        ids = rng.choice(NUM_BLOCKS, BLOCKS_PER_CHUNK, replace=False).tolist()
        out.append((key(1000 + i, GROUP_IDS[pos]), pos, ids))
    return out


def _store_all(copier, store, chunks, threads=4):
    after = copier.mark()

    def put(c):
        k, pos, ids = c
        return store_chunk(copier, store, k, group_pos=pos, blocks=list(enumerate(ids)),
                           position=64, parent=None, after=after)

    with ThreadPoolExecutor(threads) as ex:
        return list(ex.map(put, chunks))


def _load_all(copier, store, chunks, targets, threads=4):
    after = copier.mark()

    def get(item):
        (k, pos, _), tgt = item
        return load_chunk(copier, store, k, group_pos=pos, blocks=list(enumerate(tgt)),
                          after=after)

    with ThreadPoolExecutor(threads) as ex:
        return list(ex.map(get, zip(chunks, targets)))


def test_concurrent_jobs_and_pool_bounded_and_reused(tmp_path, monkeypatch):
    """48 chunks of every group on 4 threads with 2 pinned buffers: bit-exact both ways,
    2 pinned allocations in all, one staging buffer per thread, no pin_memory() calls."""
    store = make_store(tmp_path)
    src, dst = kv_tensors("cuda", 1), kv_tensors("cuda", 2)
    saver, loader = copier_for(store, src, buffers=2), copier_for(store, dst, buffers=2)
    chunks = _chunks(48, 0)
    rng = np.random.default_rng(1)
    # distinct target blocks per group (tensors are shared by groups 0 and 1)
    targets = [rng.choice(NUM_BLOCKS, BLOCKS_PER_CHUNK, replace=False).tolist() for _ in chunks]

    def no_pinning(*a, **k):
        raise AssertionError("pin_memory() called in the copy path")

    assert (saver.pool.allocations, loader.pool.allocations) == (2, 2)  # preallocated
    monkeypatch.setattr(torch.Tensor, "pin_memory", no_pinning)
    assert all(n > 0 for n in _store_all(saver, store, chunks))
    _load_all(loader, store, chunks, targets)
    monkeypatch.undo()
    assert (saver.pool.allocations, loader.pool.allocations) == (2, 2)
    assert saver.pool.peak_in_use <= 2 and loader.pool.peak_in_use <= 2
    assert 1 <= saver.staging_allocations <= 4 and 1 <= loader.staging_allocations <= 4
    # the last load of each (group, target block) wins; check chunk by chunk from a fresh KV
    for (k, pos, ids), tgt in zip(chunks, targets):
        fresh = kv_tensors("cuda", 3)
        load_chunk(copier_for(store, fresh), store, k, group_pos=pos,
                   blocks=list(enumerate(tgt)))
        want = pages_of(src, pos, ids)
        assert all(np.array_equal(g, w) for g, w in zip(pages_of(fresh, pos, tgt), want))


def test_events_not_synchronize_in_the_hot_path(tmp_path, monkeypatch):
    """Stores and loads wait on one event per chunk, never on a device or stream sync."""
    store = make_store(tmp_path)
    src, dst = kv_tensors("cuda", 4), kv_tensors("cuda", 5)
    saver, loader = copier_for(store, src), copier_for(store, dst)
    chunks = _chunks(12, 2)
    targets = [ids for _, _, ids in chunks]

    def forbidden(*a, **k):
        raise AssertionError("synchronize in the hot path")

    monkeypatch.setattr(torch.cuda, "synchronize", forbidden)
    monkeypatch.setattr(torch.cuda.Stream, "synchronize", forbidden)
    _store_all(saver, store, chunks)
    _load_all(loader, store, chunks, targets)
    monkeypatch.undo()
    assert saver.events_waited == len(chunks) and loader.events_waited == len(chunks)


def _busy(device):
    """Queue a few hundred ms of work on the current stream."""
    x = torch.randn(4096, 4096, device=device)
    for _ in range(40):
        x = torch.tanh(x @ x)
    return x


def test_copies_wait_for_the_engine_stream(tmp_path):
    """A store sees KV the engine's stream writes before the job was submitted; a load
    lands after the engine's earlier writes to its blocks (the marks are waited on)."""
    store = make_store(tmp_path)
    src, dst = kv_tensors("cuda", 6), kv_tensors("cuda", 7)
    saver, loader = copier_for(store, src), copier_for(store, dst)
    ids = [3, 9, 27, 50]
    k = key(77, GROUP_IDS[0])
    index = torch.tensor(ids, device=src[0].device)  # (a pageable copy syncs: do it first)
    _busy(src[0].device)
    src[0].index_fill_(0, index, 5)  # queued behind the busy work
    store_chunk(saver, store, k, group_pos=0, blocks=list(enumerate(ids)), position=64,
                parent=None, after=saver.mark())
    header, arrays = store.read(k)
    assert (arrays[0] == 5).all()
    _busy(dst[0].device)
    dst[0].index_fill_(0, index, 0)
    load_chunk(loader, store, k, group_pos=0, blocks=list(enumerate(ids)), after=loader.mark())
    assert (dst[0][ids, :].cpu() == 5).all()
