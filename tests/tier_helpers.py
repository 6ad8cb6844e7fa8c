"""A rig around vLLM's real ``TieringOffloadingManager`` with ``HybridKVTier`` under it.

vLLM's CPU-tier worker needs CUDA, so the tests drive the scheduler side only:
the manager is built through vLLM's own ``OffloadingSpecFactory`` from a
``VllmConfig`` and a hand-built ``KVCacheConfig`` (``harness``), inside the
hand-over ``HybridKVConnector`` does (``kv_cache_config_context``); its CPU region
is a real ``SharedOffloadRegion``. What vLLM's GPU -> CPU copy would put in a
slot is written here as known bytes; a promotion is read back from the region.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import xxhash
from vllm.config import KVTransferConfig
from vllm.distributed.kv_transfer.kv_connector.v1.offloading.config import (
    build_offloading_config,
)
from vllm.v1.kv_offload.base import LookupResult, ReqContext, ScheduleEndContext, make_offload_key
from vllm.v1.kv_offload.factory import OffloadingSpecFactory

import harness as H
from hybridkv.vllm import tier_transfer_config
from hybridkv.vllm.spec import kv_cache_config_context

_END = ScheduleEndContext(new_req_ids=(), preempted_req_ids=())
_ENGINES = itertools.count()

LAYOUTS = {
    # Gemma-3-like: 5 sliding-window layers per full-attention layer
    "gemma": lambda: (H.gemma_layers(16, 32), 16),
    # Jamba-like: Mamba state groups whose pages are padded to the attention page
    "jamba": lambda: (H.jamba_layers(H.hybrid_block_size(H.mamba1(16))),
                      H.hybrid_block_size(H.mamba1(16))),
    # Qwen3-Next-like: state + full attention (Mamba2-shaped linear state), 3 : 1
    "qwen": lambda: ({f"model.layers.{i}.{'self_attn' if i % 4 == 3 else 'linear_attn'}":
                      (H.attention(H.hybrid_block_size(H.mamba2(16))) if i % 4 == 3
                       else H.mamba2(H.hybrid_block_size(H.mamba2(16))))
                      for i in range(8)}, H.hybrid_block_size(H.mamba2(16))),
}


class TierRig:
    """One engine's scheduler-side tiering manager on ``cache_dir``."""

    def __init__(self, model_dir: Path, cache_dir: Path, layout: str = "jamba", *,
                 cpu_bytes: int = 8 << 20, num_blocks: int = 400, blocks_per_chunk: int = 1,
                 secondary: dict | None = None, kv_events: bool = False, **settings):
        """``settings``: HybridKVTier's; ``secondary``: another tier's config instead
        (e.g. vLLM's ``{"type": "fs", "root_dir": ...}``); ``layout``: a ``LAYOUTS`` name or
        (layer specs, block size)."""
        specs, block_size = LAYOUTS[layout]() if isinstance(layout, str) else layout
        settings.setdefault("refresh_interval", 0)
        config = H.make_vllm_config(model_dir, cache_dir, block_size=block_size)
        tiering = {"blocks_per_chunk": blocks_per_chunk} if blocks_per_chunk > 1 else None
        transfer = tier_transfer_config(str(cache_dir), cpu_bytes, tiering=tiering, **settings)
        if secondary is not None:
            transfer["kv_connector_extra_config"]["secondary_tiers"] = [dict(secondary)]
        config.kv_transfer_config = KVTransferConfig(**transfer)
        if kv_events:
            from vllm.config import KVEventsConfig

            config.kv_events_config = KVEventsConfig(enable_kv_cache_events=True,
                                                     publisher="null")
        config.kv_transfer_config.engine_id = f"hkv-tier-test-{next(_ENGINES)}-{time.time_ns()}"
        _, sched = H.build_kv_cache_configs(config, specs, num_blocks)
        self.sched_cfg = sched
        offloading = build_offloading_config(config, sched)
        with kv_cache_config_context(sched):
            self.spec = OffloadingSpecFactory.create_spec(offloading)
            self.manager = self.spec.get_manager()
        (self.tier,) = self.manager.secondary_tiers
        self.rows = np.asarray(self.manager.primary_tier.get_kv_memoryview()).view(np.uint8)
        self.group_ids = [g.group_id for g in offloading.groups]
        self.chunk_tokens = {g.group_id: g.tokens_per_block * blocks_per_chunk
                             for g in offloading.groups}

    # ------------------------------------------------------------------ requests
    def request(self, name: str, n_chunks: int, seed: int = 0,
                groups: list[int] | None = None) -> tuple[ReqContext, list[bytes]]:
        """A request of ``n_chunks`` chunks per group (or ``groups``): its context and keys."""
        ctx = ReqContext(req_id=name)
        keys = []
        for g in groups if groups is not None else self.group_ids:
            for i in range(n_chunks):
                h = xxhash.xxh3_128_digest(f"{seed}:{i}".encode())
                key = make_offload_key(h, g)
                ctx.set_offload_key_position(key, (i + 1) * self.chunk_tokens[g])
                keys.append(key)
        return ctx, keys

    def expected(self, key: bytes) -> np.ndarray:
        """The slot bytes vLLM's copy would have put there for ``key``."""
        rng = np.random.default_rng(int.from_bytes(xxhash.xxh64_digest(key), "little"))
        return rng.integers(0, 256, self.rows.shape[1], dtype=np.uint8)

    def group_bytes(self, key: bytes, row: np.ndarray) -> bytes:
        from hybridkv.keys import key_group

        slots = getattr(self.tier, "slots", None)
        if slots is None:  # another tier stores whole slots
            return row.tobytes()
        return b"".join(a.tobytes() for a in slots.gather(row, key_group(key)))

    # ------------------------------------------------------------------ flows
    def store(self, ctx: ReqContext, keys: list[bytes], *, finish: bool = True) -> list[bytes]:
        """GPU -> CPU (known bytes) -> cascade to the tier; returns the keys vLLM stored."""
        m = self.manager
        m.on_new_request(ctx)
        out = m.prepare_store(keys, ctx)
        assert out is not None, "the CPU tier had no room"
        for key, cid in zip(out.keys_to_store, out.store_spec.chunk_ids):
            self.rows[int(cid)] = self.expected(key)
        if out.keys_to_store:  # vLLM calls complete_store only for stores it prepared
            m.complete_store(out.keys_to_store, ctx)
        if finish:
            m.on_request_finished(ctx)
        self.settle()
        return list(out.keys_to_store)

    def settle(self, timeout: float = 30.0) -> None:
        """Step until every tier job has been reported to the manager."""
        deadline = time.monotonic() + timeout
        while self.manager.has_pending_work():
            self.manager.on_schedule_end(_END)
            assert time.monotonic() < deadline, "tier jobs did not finish"
            time.sleep(0.002)
        self.manager.on_schedule_end(_END)

    def lookup(self, ctx: ReqContext, keys: list[bytes], timeout: float = 30.0) -> dict:
        """Look ``keys`` up until each is HIT (in the CPU tier, promoted if needed) or MISS."""
        m = self.manager
        m.on_new_request(ctx)
        results: dict[bytes, LookupResult] = {}
        deadline = time.monotonic() + timeout
        while True:
            results = {k: m.lookup(k, ctx) for k in keys}
            if all(r in (LookupResult.HIT, LookupResult.MISS) for r in results.values()):
                return results
            assert time.monotonic() < deadline, f"lookups did not resolve: {results}"
            m.on_schedule_end(_END)
            time.sleep(0.002)

    def loaded_bytes(self, ctx: ReqContext, key: bytes) -> bytes:
        """The group's bytes of ``key``'s CPU slot, as vLLM's CPU -> GPU copy would read them."""
        m = self.manager
        spec = m.prepare_load([key], ctx)
        (cid,) = spec.chunk_ids
        data = self.group_bytes(key, self.rows[int(cid)])
        m.complete_load([key], ctx)
        return data

    def close(self) -> None:
        self.rows = None  # the region's mmap closes only without views into it
        self.manager.shutdown()
