"""Translate vLLM's KV-cache configuration into a hybridkv ``HybridLayout``.

The scheduler process and every worker build the layout with this same
function from the same ``KVCacheConfig``, so they agree on the fingerprint
(the directory) without talking to each other. The worker rank is not part of
the fingerprint; it is a path component.
"""

from __future__ import annotations

from vllm.v1.kv_cache_interface import (
    ChunkedLocalAttentionSpec,
    KVCacheConfig,
    KVCacheSpec,
    MambaSpec,
    SlidingWindowSpec,
    UniformTypeKVCacheSpecs,
)
from vllm.v1.kv_offload.config import OffloadingConfig

from hybridkv.config import ConfigError
from hybridkv.groups import GroupKind, GroupSpec, HybridLayout, ParallelSpec

__all__ = ["layout_from_vllm", "group_kind_of"]


def _representative(spec: KVCacheSpec) -> KVCacheSpec:
    if isinstance(spec, UniformTypeKVCacheSpecs):
        return next(iter(spec.kv_cache_specs.values()))
    return spec


def group_kind_of(spec: KVCacheSpec) -> tuple[GroupKind, int | None]:
    """(kind, window in tokens) of a vLLM KV-cache spec."""
    spec = _representative(spec)
    if isinstance(spec, MambaSpec):
        return GroupKind.STATE, None
    if isinstance(spec, SlidingWindowSpec):
        return GroupKind.SLIDING, int(spec.sliding_window)
    if isinstance(spec, ChunkedLocalAttentionSpec):
        return GroupKind.SLIDING, int(spec.attention_chunk_size)
    return GroupKind.FULL, None


def _page_bytes(spec: KVCacheSpec) -> int:
    return int(_representative(spec).real_page_size_bytes)


def _check_state_blocks(groups: list[GroupSpec]) -> None:
    """Refuse state blocks that differ from attention blocks.

    vLLM's align-mode scheduler splits prefills at the smallest block size, so a
    state block larger than the attention block would be stored holding the
    state of another token position: a restored hit would be wrong.
    """
    state = {g.block_tokens for g in groups if g.kind is GroupKind.STATE}
    attention = {g.block_tokens for g in groups if g.kind is not GroupKind.STATE}
    if state and attention and state | attention != attention:
        raise ConfigError(
            f"hybridkv cannot offload state groups with {sorted(state)}-token blocks next to "
            f"attention groups with {sorted(attention)}-token blocks: the stored states would "
            "not sit at chunk boundaries. Let vLLM pick the block size (enable prefix caching "
            "and leave --block-size unset) so state and attention blocks are equal.")


def layout_from_vllm(config: OffloadingConfig, kv_cache_config: KVCacheConfig) -> HybridLayout:
    groups = []
    for g in config.groups:
        spec = kv_cache_config.kv_cache_groups[g.group_id].kv_cache_spec
        kind, window = group_kind_of(spec)
        groups.append(GroupSpec(
            index=g.group_id, kind=kind, block_tokens=g.tokens_per_block,
            chunk_tokens=g.tokens_per_block * config.cache.blocks_per_chunk,
            layer_names=tuple(g.layer_names), page_bytes=_page_bytes(spec),
            dtype=config.model.dtype, window_tokens=window,
        ))
    _check_state_blocks(groups)
    p = config.parallel
    return HybridLayout(
        model=config.model.name, dtype=config.model.dtype, groups=tuple(groups),
        parallel=ParallelSpec(tp_size=p.tp_size, pp_size=p.pp_size, pcp_size=p.pcp_size,
                              dcp_size=p.dcp_size, rank=0),
        tokens_per_hash=config.cache.tokens_per_hash,
    )
