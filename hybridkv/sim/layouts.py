"""Model layouts for the simulator, shaped like real hybrids (bytes per token, state sizes).

Each ``SimModel`` is a ``HybridLayout`` grouped the way vLLM's hybrid allocator
groups the model (equal-sized groups of one kind) plus a ``PrefillCost``.
Offload chunks are 256 tokens (one engine block per chunk, as hybridkv
recommends for state models). Sizes, bf16 unless noted:

- ``gemma3_27b``: 62 layers, 5 sliding : 1 full, window 1024; 16 KV heads x 128
  -> 8 KiB per token per layer. One full group (10 layers), five sliding
  groups (10 layers each).
- ``jamba_mini``: 32 layers, 1 attention : 7 Mamba; 8 KV heads x 128 -> 4 KiB
  per token per attention layer; a Mamba-1 state is 560 KiB per layer (fp32
  SSM state 8192 x 16 plus conv state). One attention group (4 layers), seven
  state groups (4 layers each): 15.3 MiB of state per checkpoint.
- ``qwen3_next_80b``: 48 layers, 3 gated-delta-net : 1 full; 2 KV heads x 256
  -> 2 KiB per token per attention layer; a delta-net state is 32 heads x
  128 x 128 plus conv state, 1.05 MiB per layer. One full group (12 layers),
  three state groups (12 layers each): 37.7 MiB of state per checkpoint.
"""

from __future__ import annotations

import msgspec

from hybridkv.cost import PrefillCost
from hybridkv.groups import GroupKind, GroupSpec, HybridLayout

__all__ = ["SimModel", "SIM_MODELS", "CHUNK_TOKENS"]

CHUNK_TOKENS = 256


class SimModel(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    description: str
    layout: HybridLayout
    cost: PrefillCost


def _groups(spec: list[tuple[GroupKind, int, int, int | None]]) -> tuple[GroupSpec, ...]:
    """(kind, layers, bytes per layer per chunk, window) -> groups, indexed in order."""
    out, layer = [], 0
    for index, (kind, layers, page, window) in enumerate(spec):
        names = tuple(f"layers.{layer + i}" for i in range(layers))
        layer += layers
        out.append(GroupSpec(index=index, kind=kind, block_tokens=CHUNK_TOKENS,
                             chunk_tokens=CHUNK_TOKENS, layer_names=names, page_bytes=page,
                             dtype="bfloat16", window_tokens=window))
    return tuple(out)


def _model(name: str, description: str, spec, cost: PrefillCost) -> SimModel:
    layout = HybridLayout(model=name, dtype="bfloat16", groups=_groups(spec))
    return SimModel(name=name, description=description, layout=layout, cost=cost)


_GEMMA_PAGE = 16 * 128 * 2 * 2 * CHUNK_TOKENS  # K+V, 16 heads x 128, bf16
_JAMBA_PAGE = 8 * 128 * 2 * 2 * CHUNK_TOKENS
_JAMBA_STATE = 8192 * 16 * 4 + 3 * 8192 * 2  # fp32 SSM state + bf16 conv state
_QWEN_PAGE = 2 * 256 * 2 * 2 * CHUNK_TOKENS
_QWEN_STATE = 32 * 128 * 128 * 2 + 3 * (2 * 16 * 128 + 32 * 128) * 2

SIM_MODELS: dict[str, SimModel] = {
    m.name: m for m in (
        _model("gemma3_27b", "Gemma-3-27B-like: 5 sliding (window 1024) : 1 full",
               [(GroupKind.FULL, 10, _GEMMA_PAGE, None)]
               + [(GroupKind.SLIDING, 10, _GEMMA_PAGE, 1024)] * 5,
               PrefillCost(linear=2 * 27e9, full_q_dims=(4096,) * 10,
                           window_layers=((4096, 1024),) * 52)),
        _model("jamba_mini", "Jamba-1.5-Mini-like: 1 attention : 7 Mamba",
               [(GroupKind.FULL, 4, _JAMBA_PAGE, None)]
               + [(GroupKind.STATE, 4, _JAMBA_STATE, None)] * 7,
               PrefillCost(linear=2 * 12e9, full_q_dims=(4096,) * 4)),
        _model("qwen3_next_80b", "Qwen3-Next-80B-A3B-like: 3 gated delta net : 1 full",
               [(GroupKind.FULL, 12, _QWEN_PAGE, None)]
               + [(GroupKind.STATE, 12, _QWEN_STATE, None)] * 3,
               PrefillCost(linear=2 * 3e9, full_q_dims=(4096,) * 12)),
    )
}
