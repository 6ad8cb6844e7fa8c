"""HybridKVWorker's copies through hybridkv.pages (vLLM's real spec types, CPU tensors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pages_helpers import (
    GROUP_IDS,
    GROUP_REFS,
    NUM_BLOCKS,
    key,
    kv_tensors,
    make_store,
    pages_of,
)

pytestmark = pytest.mark.fast


def _worker(store, tensors):
    from vllm.v1.kv_offload.base import (
        CanonicalKVCacheRef,
        CanonicalKVCaches,
        CanonicalKVCacheTensor,
    )

    from hybridkv.vllm.worker import HybridKVWorker

    caches = CanonicalKVCaches(
        tensors=[CanonicalKVCacheTensor(t, t.shape[1]) for t in tensors],
        group_data_refs=[[CanonicalKVCacheRef(t, page) for t, page in refs]
                         for refs in GROUP_REFS])
    return HybridKVWorker(store, caches, GROUP_IDS, blocks_per_chunk=4, io_threads=3)


def _finish(worker, job):
    worker.wait({job})
    results = worker.get_finished()
    assert [r.job_id for r in results] == [job] and results[0].success
    return worker.take_failed_loads()


def test_worker_store_then_load_every_group(tmp_path):
    """A job of 2 chunks per group (the first partial: blocks start at logical block 2)
    is stored, then loaded into other blocks bit-exact; the state rows' padding stays."""
    from vllm.v1.kv_offload.base import GPULoadStoreSpec

    from hybridkv.vllm.transfer import ChunkLoadSpec, ChunkStoreSpec

    store = make_store(tmp_path)
    src, dst = kv_tensors("cpu", 20), kv_tensors("cpu", 21)
    saver, loader = _worker(store, src), _worker(store, dst)
    rng = np.random.default_rng(0)
    keys, src_ids, dst_ids = [], [], []
    # groups 0 and 1 share tensors (as in vLLM), so every group gets its own blocks
    src_all = rng.permutation(NUM_BLOCKS).tolist()
    dst_all = rng.permutation(NUM_BLOCKS).tolist()
    for g in GROUP_IDS:  # logical blocks 2..7: chunk 0 holds 2 blocks, chunk 1 all 4
        keys += [key(10 * g, g), key(10 * g + 1, g)]
        src_ids.append(src_all[6 * g:6 * g + 6])
        dst_ids.append(dst_all[6 * g:6 * g + 6])
    sizes, firsts = [6] * len(GROUP_IDS), [2] * len(GROUP_IDS)
    saver.submit_store(1, GPULoadStoreSpec(sum(src_ids, []), sizes, firsts),
                       ChunkStoreSpec(keys, [32, 64] * len(GROUP_IDS), [None] * len(keys)))
    assert _finish(saver, 1) == set()
    assert saver.counters.get("chunks_written") == len(keys)
    before = [t.clone() for t in dst]
    loader.submit_load(2, ChunkLoadSpec(keys), GPULoadStoreSpec(sum(dst_ids, []), sizes, firsts))
    assert _finish(loader, 2) == set()
    for pos in range(len(GROUP_IDS)):
        want = pages_of(src, pos, src_ids[pos])
        assert all(np.array_equal(g, w) for g, w in zip(pages_of(dst, pos, dst_ids[pos]), want))
        for t, page in GROUP_REFS[pos]:
            assert torch.equal(dst[t][dst_ids[pos], page:], before[t][dst_ids[pos], page:])
    saver.shutdown()
    loader.shutdown()
