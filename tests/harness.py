"""Scheduler-level harness: vLLM's real ``Scheduler`` + hybridkv's worker, no model.

Jamba-style (Mamba + attention) and Mamba2 models cannot run end to end on the
CPU backend, so this drives the engine loop by hand, the way vLLM's own
connector unit tests do (tests/v1/kv_connector/unit/offloading_connector):

- a tiny Hugging Face config on disk gives vLLM a ``ModelConfig`` (no weights,
  no tokenizer, no download);
- per-layer ``KVCacheSpec``s (FullAttentionSpec / SlidingWindowSpec /
  MambaSpec) go through vLLM's own ``get_kv_cache_configs`` (grouping, page
  unification, tensor sharing) and ``allocate_kv_cache`` (the CPU byte views a
  worker registers), exactly as the engine core and model runner do;
- the scheduler process holds a real ``Scheduler`` whose connector is
  ``HybridKVConnector`` (role SCHEDULER); the "worker" holds another
  ``HybridKVConnector`` (role WORKER) over the allocated CPU tensors;
- ``Engine._forward`` stands in for the model runner: it performs the
  scheduler's copy-on-write block copies and writes deterministic bytes into
  every block the step fills. A block's bytes are a pure function of (group,
  layer, token prefix it summarises), so whoever later reads a block can say
  what it must contain: attention block ``i`` summarises the prefix ending at
  the block's last token, a Mamba state block the prefix ending where the step
  stopped.

``Engine.run`` loops schedule -> start_load_kv -> forward -> wait_for_save ->
get_transfer_results -> update_from_output (what vLLM's model-runner mixin
does) until every request finished and every store completed. Before a
request's first forward, ``check_context`` asserts that every block the model
would read at its start position holds the right bytes (all full-attention
blocks of the prefix, the sliding-window blocks in the window, the Mamba state
block at the start position) and ``check_loads`` that every block a load
filled equals the rows of the chunk file it came from.

Mamba groups use ``mamba_cache_mode="align"``: the mode vLLM picks whenever
prefix caching is on, and the only one in which the offloading connector gets
Mamba states at exact token boundaries (the scheduler's boundary-state
hand-offs, ``requires_cow_source``). The fake forward models align-mode state
placement: the state after a step ending at token ``e`` sits in block
``cdiv(e, block) - 1``.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vllm import SamplingParams
from vllm.config import (
    CacheConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
    set_current_vllm_config,
)
from vllm.distributed.kv_transfer.kv_connector.v1 import KVConnectorRole
from vllm.distributed.kv_transfer.kv_connector.v1.offloading.common import (
    OffloadingConnectorMetadata,
)
from vllm.forward_context import ForwardContext
from vllm.utils.hashing import sha256
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum
from vllm.v1.attention.backends.utils import resolve_kv_cache_layout
from vllm.v1.core.kv_cache_utils import (
    generate_scheduler_kv_cache_config,
    get_request_block_hasher,
    init_none_hash,
    resolve_cache_hit_alignment_tokens,
    resolve_kv_cache_block_sizes,
)
from vllm.v1.core.sched.scheduler import Scheduler

try:  # vLLM 0.32
    from vllm.v1.core.kv_cache_utils import get_kv_cache_configs as _kv_cache_configs
except ImportError:  # vLLM 0.33: planning moved; the engine core groups layers once for all workers
    from vllm.v1.core.kv_cache_planning import get_global_kv_cache_groups
    from vllm.v1.core.kv_cache_planning import get_kv_cache_configs as _configs_033

    def _kv_cache_configs(vllm_config, specs, memory):
        return _configs_033(vllm_config, specs, memory,
                            get_global_kv_cache_groups(vllm_config, specs))
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheSpec,
    MambaSpec,
    SlidingWindowSpec,
    UniformTypeKVCacheSpecs,
)
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager
from vllm.v1.worker.utils import allocate_kv_cache

from hybridkv.vllm import kv_transfer_config
from hybridkv.vllm.connector import HybridKVConnector

SAMPLED_TOKEN = 7
DTYPE = torch.float32
HEAD_SIZE = 8
KV_HEADS = 2


# ---------------------------------------------------------------- model shapes
def attention(block: int) -> FullAttentionSpec:
    return FullAttentionSpec(block_size=block, num_kv_heads=KV_HEADS, head_size=HEAD_SIZE,
                             dtype=DTYPE)


def sliding(block: int, window: int) -> SlidingWindowSpec:
    return SlidingWindowSpec(block_size=block, num_kv_heads=KV_HEADS, head_size=HEAD_SIZE,
                             dtype=DTYPE, sliding_window=window)


def mamba1(block: int) -> MambaSpec:
    # Mamba1 (Jamba): conv state (d_inner, d_conv - 1), ssm state (d_inner, d_state);
    # 2816 bytes: more than a 16-token attention page (2048), as in real Jamba
    return MambaSpec(block_size=block, shapes=((64, 3), (64, 8)), dtypes=(DTYPE, DTYPE),
                     mamba_type=MambaAttentionBackendEnum.MAMBA1, mamba_cache_mode="align")


def mamba2(block: int) -> MambaSpec:
    # Mamba2: conv state (conv_dim, d_conv - 1), ssm state (n_heads, head_dim, d_state)
    return MambaSpec(block_size=block, shapes=((48, 3), (4, 8, 4)), dtypes=(DTYPE, DTYPE),
                     mamba_type=MambaAttentionBackendEnum.MAMBA2, mamba_cache_mode="align")


def hybrid_block_size(state: MambaSpec, granularity: int = 16) -> int:
    """The block size vLLM gives a Mamba + attention model with prefix caching.

    Like vLLM's ``HybridAttentionMambaModelConfig``: the attention block is
    raised (in multiples of ``granularity``) until an attention page holds a
    Mamba state, and in "align" mode the Mamba block equals it.
    """
    per_token = attention(1).page_size_bytes
    return -(-state.page_size_bytes // (per_token * granularity)) * granularity


def jamba_layers(attn_block: int, mamba_block: int | None = None, *, mamba=mamba1,
                 num_layers: int = 16) -> dict[str, KVCacheSpec]:
    """Jamba's pattern: one attention layer per 8 (offset 4), Mamba elsewhere.

    16 layers -> 2 attention + 14 Mamba -> vLLM groups them 1 attention group
    + 7 Mamba groups of 2 layers each.
    """
    mamba_block = mamba_block or attn_block
    return {f"model.layers.{i}.{'self_attn' if i % 8 == 4 else 'mamba'}":
            (attention(attn_block) if i % 8 == 4 else mamba(mamba_block))
            for i in range(num_layers)}


def gemma_layers(block: int, window: int, num_layers: int = 12) -> dict[str, KVCacheSpec]:
    """Gemma-3's pattern: 5 sliding-window layers then 1 global layer."""
    return {f"model.layers.{i}.self_attn":
            (attention(block) if i % 6 == 5 else sliding(block, window))
            for i in range(num_layers)}


def mixed_layers(block: int, window: int) -> dict[str, KVCacheSpec]:
    """full : sliding : mamba = 2 : 2 : 4 -> four groups of two layers."""
    kinds = ["full", "mamba", "sliding", "mamba", "full", "mamba", "sliding", "mamba"]
    make = {"full": lambda: attention(block), "sliding": lambda: sliding(block, window),
            "mamba": lambda: mamba2(block)}
    return {f"model.layers.{i}.{k}": make[k]() for i, k in enumerate(kinds)}


# ---------------------------------------------------------------- configs
def write_tiny_model(model_dir: Path) -> Path:
    """A config-only Llama directory: enough for vLLM's ModelConfig, no weights."""
    from transformers import LlamaConfig

    model_dir.mkdir(parents=True, exist_ok=True)
    if not (model_dir / "config.json").exists():
        LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=KV_HEADS,
                    max_position_embeddings=4096,
                    architectures=["LlamaForCausalLM"]).save_pretrained(model_dir)
    return model_dir


def make_vllm_config(model_dir: Path, cache_dir: Path, *, block_size: int,
                     max_num_batched_tokens: int = 128,
                     retention_interval: int | None = None,
                     **hybridkv_settings: Any) -> VllmConfig:
    model_config = ModelConfig(model=str(model_dir), skip_tokenizer_init=True,
                               max_model_len=2048, dtype="float32", seed=0)
    cache_config = CacheConfig(block_size=block_size, enable_prefix_caching=True,
                               mamba_cache_mode="align",
                               prefix_cache_retention_interval=retention_interval)
    scheduler_config = SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens,
                                       max_num_seqs=16, max_model_len=2048,
                                       enable_chunked_prefill=True,
                                       is_encoder_decoder=False)
    hybridkv_settings.setdefault("refresh_interval", 0)
    kv = KVTransferConfig(**kv_transfer_config(str(cache_dir), **hybridkv_settings))
    config = VllmConfig(model_config=model_config, cache_config=cache_config,
                        scheduler_config=scheduler_config, kv_transfer_config=kv)
    config.scheduler_config.async_scheduling = False
    return config


def build_kv_cache_configs(vllm_config: VllmConfig, layer_specs: dict[str, KVCacheSpec],
                           num_blocks: int) -> tuple[KVCacheConfig, KVCacheConfig]:
    """(worker config, scheduler config), as the engine core builds them."""
    vllm_config.cache_config.num_gpu_blocks_override = num_blocks
    layout = resolve_kv_cache_layout(vllm_config, [["LBHNC", "LBNHC"]],
                                     list(layer_specs.values()))
    vllm_config.cache_config.kv_cache_layout = layout.name
    (worker,) = _kv_cache_configs(vllm_config, [dict(layer_specs)], [1 << 40])
    worker.kv_cache_layout = layout.name
    sched = generate_scheduler_kv_cache_config([worker])
    vllm_config.cache_config.num_gpu_blocks = sched.num_blocks
    vllm_config.cache_config.block_size = min(
        g.kv_cache_spec.block_size for g in sched.kv_cache_groups)
    sched_bs, hash_bs = resolve_kv_cache_block_sizes(sched, vllm_config)
    align = resolve_cache_hit_alignment_tokens(sched, vllm_config, sched_bs, hash_bs)
    for cfg in (worker, sched):
        cfg.hash_block_size = hash_bs
        cfg.cache_hit_alignment_tokens = align
    return worker, sched


# ---------------------------------------------------------------- bytes
def group_kind(spec: KVCacheSpec) -> str:
    if isinstance(spec, UniformTypeKVCacheSpecs):
        spec = next(iter(spec.kv_cache_specs.values()))
    if isinstance(spec, MambaSpec):
        return "state"
    if isinstance(spec, SlidingWindowSpec):
        return "sliding"
    return "full"


def expected_page(group: int, layer: int, prefix: tuple[int, ...], nbytes: int) -> np.ndarray:
    """The bytes a block summarising ``prefix`` holds for one layer of one group."""
    digest = hashlib.blake2b(np.asarray(prefix, dtype=np.int32).tobytes(), digest_size=8,
                             person=f"{group}:{layer}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "little"))
    return rng.integers(0, 256, size=nbytes, dtype=np.uint8)


@dataclass
class GroupInfo:
    gid: int
    kind: str
    block_size: int
    window: int | None
    layers: list[str]
    pages: list[torch.Tensor]  # per layer: int8 (num_blocks, unpadded page bytes) views


def page_views(worker_cfg: KVCacheConfig,
               kv_caches: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per layer, the (num_blocks, page bytes) int8 view of the bytes vLLM addresses."""
    num_blocks = worker_cfg.num_blocks
    views = {}
    for group in worker_cfg.kv_cache_groups:
        spec = group.kv_cache_spec
        for name in group.layer_names:
            layer_spec = (spec.kv_cache_specs[name] if isinstance(spec, UniformTypeKVCacheSpecs)
                          else spec)
            t = kv_caches[name]
            assert t.shape[0] == num_blocks, (name, t.shape)
            stride = t.stride(0) * t.element_size()
            page = layer_spec.real_page_size_bytes
            flat = torch.empty(0, dtype=torch.int8).set_(t.untyped_storage())
            views[name] = flat.as_strided((num_blocks, page), (stride, 1),
                                          t.storage_offset() * t.element_size())
    return views


# ---------------------------------------------------------------- engine
@dataclass
class Loaded:
    """One load job as the scheduler issued it: chunk keys and destination blocks."""

    req_id: str
    keys: list[bytes]
    groups: list[tuple[int, int, list[int]]]  # (group id, first logical block, block ids)
    verified: bool = False


class Engine:
    """One engine instance: a real Scheduler and one worker with its own KV tensors.

    ``check=True`` verifies, before each request's first forward, the bytes of
    every block the model would read (``check_context``) and the bytes of every
    block a load filled against the chunk file it came from (``check_loads``).
    """

    def __init__(self, vllm_config: VllmConfig, layer_specs: dict[str, KVCacheSpec],
                 num_blocks: int = 400, check: bool = True):
        self.vllm_config = vllm_config
        self.check = check
        self.worker_cfg, self.sched_cfg = build_kv_cache_configs(
            vllm_config, layer_specs, num_blocks)
        sched_block, hash_block = resolve_kv_cache_block_sizes(self.sched_cfg, vllm_config)
        with set_current_vllm_config(vllm_config):
            self.scheduler = Scheduler(
                vllm_config=vllm_config, kv_cache_config=self.sched_cfg,
                structured_output_manager=StructuredOutputManager(vllm_config),
                log_stats=True, block_size=sched_block, hash_block_size=hash_block)
            self.worker = HybridKVConnector(vllm_config, KVConnectorRole.WORKER,
                                            self.worker_cfg)
            self.kv_caches = allocate_kv_cache(
                self.worker_cfg, torch.device("cpu"),
                vllm_config.cache_config.get_resolved_kv_cache_layout())
            self.worker.register_kv_caches(self.kv_caches)
        connector = self.scheduler.connector
        assert isinstance(connector, HybridKVConnector)
        self.connector: HybridKVConnector = connector
        views = page_views(self.worker_cfg, self.kv_caches)
        self.groups: list[GroupInfo] = []
        for gid, (wg, sg) in enumerate(zip(self.worker_cfg.kv_cache_groups,
                                           self.sched_cfg.kv_cache_groups)):
            spec = sg.kv_cache_spec
            self.groups.append(GroupInfo(
                gid=gid, kind=group_kind(spec), block_size=spec.block_size,
                window=getattr(spec, "sliding_window", None), layers=list(wg.layer_names),
                pages=[views[n] for n in wg.layer_names]))
        self.offload_groups = [g.group_id for g in
                               self.worker.connector_worker.spec.config.groups]
        self.blocks_per_chunk = self.worker.connector_worker.spec.blocks_per_chunk
        init_none_hash(sha256)
        self.hash_block = hash_block
        self.hasher = get_request_block_hasher(hash_block, sha256)
        #: request id -> tokens the connector said it would load
        self.external_tokens: dict[str, int] = {}
        #: request id -> num_computed_tokens at its first forward
        self.start_tokens: dict[str, int] = {}
        self.loads: list[Loaded] = []
        self.steps = 0
        self._spy_on_connector()
        self._ctx = ForwardContext(no_compile_layers={}, attn_metadata={}, slot_mapping={})

    def _spy_on_connector(self) -> None:
        original = self.connector.update_state_after_alloc

        def spy(request, blocks, num_external_tokens):
            if num_external_tokens:
                self.external_tokens[request.request_id] = num_external_tokens
            return original(request, blocks, num_external_tokens)

        self.connector.update_state_after_alloc = spy  # type: ignore[method-assign]

    @property
    def manager(self):
        return self.connector.scheduler.manager

    @property
    def store(self):
        return self.manager.store

    # ------------------------------------------------------------ requests
    def request(self, req_id: str, prompt: list[int], max_tokens: int = 1) -> Request:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        return Request(request_id=req_id, prompt_token_ids=list(prompt),
                       sampling_params=params, pooling_params=None, block_hasher=self.hasher)

    def add(self, req_id: str, prompt: list[int], max_tokens: int = 1) -> None:
        self.scheduler.add_request(self.request(req_id, prompt, max_tokens))

    def run(self, max_steps: int = 5000) -> None:
        """Step until every request finished and every transfer completed."""
        start = self.steps
        while self.scheduler.has_requests():
            assert self.steps - start < max_steps, "engine did not drain"
            if not self.step():
                time.sleep(0.001)
        assert not self.connector.scheduler._jobs, "transfers left in flight"

    def serve(self, prompts: dict[str, list[int]]) -> None:
        """Run the prompts one after another (each hit comes from disk, not from HBM)."""
        for req_id, prompt in prompts.items():
            self.add(req_id, prompt)
            self.run()

    def step(self) -> bool:
        self.steps += 1
        out = self.scheduler.schedule()
        meta = out.kv_connector_metadata
        assert isinstance(meta, OffloadingConnectorMetadata)
        self._remember_loads(meta.load_jobs)
        self.worker.handle_preemptions(meta)
        self.worker.bind_connector_metadata(meta)
        self.worker.start_load_kv(self._ctx)
        sampled = self._forward(out)
        if out.total_num_scheduled_tokens > 0:
            self.worker.wait_for_save()
        # what KVConnectorModelRunnerMixin._get_kv_connector_output collects
        results = self.worker.get_transfer_results(out.finished_req_ids)
        kv_out = KVConnectorOutput(
            finished_sending=results.finished_sending or None,
            finished_recving=results.finished_recving or None,
            failed_recving=results.failed_recving,
            invalid_block_ids=self.worker.get_block_ids_with_load_errors(),
            kv_connector_worker_meta=self.worker.build_connector_worker_meta())
        self.worker.clear_connector_metadata()
        req_ids = list(out.num_scheduled_tokens)
        runner_out = ModelRunnerOutput(
            req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=[sampled[r] for r in req_ids], logprobs=None,
            prompt_logprobs_dict={}, pooler_output=None, kv_connector_output=kv_out)
        self.scheduler.update_from_output(out, runner_out)
        return bool(out.total_num_scheduled_tokens or not kv_out.is_empty())

    def _remember_loads(self, load_jobs) -> None:
        for job in load_jobs.values():
            spec = job.dst_spec
            ids = [int(b) for b in np.asarray(spec.block_ids).tolist()]
            groups, off = [], 0
            for pos, gid in enumerate(self.offload_groups):
                n = int(spec.group_sizes[pos])
                groups.append((gid, int(spec.block_indices[pos]), ids[off:off + n]))
                off += n
            assert off == len(ids)
            self.loads.append(Loaded(job.req_id, list(job.src_spec.keys), groups))

    # ------------------------------------------------------------ fake forward
    def _forward(self, out) -> dict[str, list[int]]:
        """What a model runner does to the KV cache: CoW copies, then new bytes."""
        for copy in out.kv_cache_block_copies or ():
            for g in self.groups:
                for page in g.pages:
                    page[copy.dst_block_id].copy_(page[copy.src_block_id])
        sampled: dict[str, list[int]] = {}
        for req_id, n in out.num_scheduled_tokens.items():
            req = self.scheduler.requests[req_id]
            end = req.num_computed_tokens  # schedule() already advanced it
            start = end - n
            if req_id not in self.start_tokens:
                self.start_tokens[req_id] = start
                if self.check:
                    self.check_loads(req_id, start)
                    self.check_context(req, start)
            tokens = list(req.all_token_ids)
            block_ids = self.scheduler.kv_cache_manager.get_block_ids(req_id)
            for g in self.groups:
                self._write_group(g, block_ids[g.gid], tokens, start, end)
            sampled[req_id] = [SAMPLED_TOKEN] if end >= req.num_tokens else []
        return sampled

    def _write_group(self, g: GroupInfo, ids: list[int], tokens: list[int],
                     start: int, end: int) -> None:
        bs = g.block_size
        if g.kind == "state":
            # the state after the step lands in the block holding position end - 1
            targets = [(ids[-(-end // bs) - 1], end)]
        else:
            targets = [(ids[i], min((i + 1) * bs, end))
                       for i in range(start // bs, -(-end // bs))]
        for block_id, upto in targets:
            if block_id == 0:
                continue
            prefix = tuple(tokens[:upto])
            for layer, page in enumerate(g.pages):
                page[block_id] = torch.from_numpy(
                    expected_page(g.gid, layer, prefix, page.shape[1]).view(np.int8))

    # ------------------------------------------------------------ checks
    def needed_blocks(self, g: GroupInfo, start: int) -> list[tuple[int, int]]:
        """(logical block, prefix end) of every block a forward from ``start`` reads."""
        bs = g.block_size
        if start == 0:
            return []
        if g.kind == "state":
            return [(-(-start // bs) - 1, start)]
        first = 0 if g.kind == "full" else max(0, start - g.window + 1) // bs
        return [(i, min((i + 1) * bs, start)) for i in range(first, -(-start // bs))]

    def check_context(self, req: Request, start: int) -> None:
        """Every block the model reads at ``start`` holds the bytes of its prefix."""
        tokens = list(req.all_token_ids)
        block_ids = self.scheduler.kv_cache_manager.get_block_ids(req.request_id)
        for g in self.groups:
            ids = block_ids[g.gid]
            for idx, upto in self.needed_blocks(g, start):
                block_id = ids[idx]
                assert block_id != 0, (
                    f"{req.request_id}: group {g.gid} ({g.kind}) block {idx} is null "
                    f"at start {start}")
                for layer, page in enumerate(g.pages):
                    want = expected_page(g.gid, layer, tuple(tokens[:upto]), page.shape[1])
                    got = page[block_id].numpy().view(np.uint8)
                    assert np.array_equal(got, want), (
                        f"{req.request_id}: group {g.gid} ({g.kind}) layer {layer} block "
                        f"{idx} (id {block_id}) holds the wrong bytes at start {start}")

    def check_loads(self, req_id: str, start: int) -> None:
        """Every loaded block the model reads at ``start`` equals its chunk file's rows.

        ``verified`` marks a load all of whose blocks are read (a failed load
        that vLLM recomputes leaves ``start`` below them, and is not checked).
        """
        bpc = self.blocks_per_chunk
        # only the last load counts: an earlier one failed and was retried
        for load in [ld for ld in self.loads if ld.req_id == req_id][-1:]:
            keys = list(load.keys)
            used = total = 0
            for gid, first, ids in load.groups:
                if not ids:
                    continue
                g = self.groups[gid]
                chunks = sorted({(first + i) // bpc for i in range(len(ids))})
                key_of = dict(zip(chunks, keys[:len(chunks)]))
                del keys[:len(chunks)]
                files: dict[int, Any] = {}
                for i, block_id in enumerate(ids):
                    logical = first + i
                    total += 1
                    if g.kind == "state":
                        read = logical == -(-start // g.block_size) - 1
                    else:
                        read = (logical + 1) * g.block_size <= start
                    if not read:
                        continue
                    used += 1
                    chunk = logical // bpc
                    if chunk not in files:
                        files[chunk] = self.store.read(key_of[chunk])
                    header, arrays = files[chunk]
                    assert (header.group, header.position) == (
                        gid, (chunk + 1) * bpc * g.block_size), (req_id, gid, chunk)
                    row = logical % bpc - header.block_offset
                    assert 0 <= row < header.num_blocks
                    for layer, page in enumerate(g.pages):
                        got = page[block_id].numpy().view(np.uint8)
                        assert np.array_equal(got, arrays[layer][row]), (
                            f"{req_id}: group {gid} block {logical} (id {block_id}) "
                            f"layer {layer} differs from its chunk file")
            assert not keys, f"{req_id}: {len(keys)} loaded chunks map to no block"
            load.verified = used == total

    # ------------------------------------------------------------ keys and files
    def chunk_key(self, prompt: list[int], gid: int, end: int) -> bytes:
        """The offload key of the chunk of group ``gid`` ending at token ``end``."""
        from vllm.v1.kv_offload.base import make_offload_key

        hashes = self.request("probe", prompt).block_hashes
        return make_offload_key(hashes[end // self.hash_block - 1], gid)

    def chunk_path(self, prompt: list[int], gid: int, end: int) -> Path:
        return self.store.path(self.chunk_key(prompt, gid, end))

    def shutdown(self) -> None:
        self.worker.shutdown()
        self.connector.shutdown()


def token_ids(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(10, 1000, size=n).tolist()


# ---------------------------------------------------------------- shared scenario
# the prompts, first run and hit oracle of the scheduler-level tests (test_scheduler_harness,
# test_compat, test_integrity: they live in different test directories)
PREFIX = token_ids(1, 200)
PROMPTS = {
    "a": PREFIX + token_ids(2, 70),   # shares 200 tokens with b
    "b": PREFIX + token_ids(3, 45),
    "c": token_ids(4, 150),
}


def first_run(make):
    """All prompts at once: b can reuse a's prefix from HBM; stores are deduplicated."""
    e = make()
    for req_id, prompt in PROMPTS.items():
        e.add(req_id, prompt)
    e.run()
    e.shutdown()
    return e


def oracle_hit(e: Engine, prompt: list[int]) -> int:
    """The longest prefix every group can serve from the files on disk.

    Full attention: every chunk before the hit point; sliding window: the
    chunks covering the window before it; Mamba: the one state chunk ending
    exactly at it. The last prompt token is always recomputed.
    """
    chunk = {g.gid: g.block_size * e.blocks_per_chunk for g in e.groups}
    step = max(chunk.values())
    best = 0
    for end in range(step, len(prompt), step):
        ok = True
        for g in e.groups:
            c = chunk[g.gid]
            if g.kind == "full":
                ends = range(c, end + 1, c)
            elif g.kind == "sliding":
                first = max(0, end - g.window + 1) // c
                ends = range((first + 1) * c, end + 1, c)
            else:
                ends = [end]
            ok = ok and all(e.chunk_path(prompt, g.gid, x).exists() for x in ends)
        if ok:
            best = end
    return best


def jamba_specs(mamba=mamba1):
    block = hybrid_block_size(mamba(16))
    return jamba_layers(block, mamba=mamba), block
