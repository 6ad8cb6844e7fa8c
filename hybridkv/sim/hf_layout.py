"""A simulator model (``SimModel``) from a Hugging Face ``config.json``, without transformers.

Which layers keep which cache, read from the fields the model's transformers config
class defines (first match wins):

- ``layer_types`` (Gemma 3, gpt-oss, Qwen3-Next, Granite-4.0-H, ...) or
  ``layers_block_type`` (Jamba, Nemotron-H, Bamba): ``full_attention`` /
  ``attention`` -> full; ``sliding_attention`` -> sliding window (``sliding_window``);
  ``chunked_attention`` -> sliding (``attention_chunk_size``); ``linear_attention`` /
  ``mamba`` -> state; ``mlp`` / ``moe`` -> no cache;
- ``hybrid_override_pattern`` (Nemotron-H): ``M`` state, ``*`` full, ``-`` / ``E`` none;
- ``attn_layer_indices`` (Bamba, Falcon-H1 style): those full, the rest state;
- ``attn_layer_period`` / ``attn_layer_offset`` (Jamba): ``i % period == offset`` full;
- the config classes' defaults when none is given: Gemma 3 ``sliding_window_pattern``
  (6), Qwen3-Next ``full_attention_interval`` (4), gpt-oss alternating (sliding first);
  any other model: every layer full attention.

Bytes, in the model's ``torch_dtype`` / ``dtype`` (bf16 when absent):
- attention: K and V, ``num_key_value_heads x head_dim`` per token per layer;
- gated delta net (``linear_*`` fields, Qwen3-Next): recurrent state
  ``Hv x dk x dv`` plus conv state ``(kernel - 1) x (2 Hk dk + Hv dv)``;
- Mamba-2 (a head count: ``mamba_n_heads`` / ``mamba_num_heads``): SSM state
  ``heads x head_dim x d_state`` plus conv state ``(d_conv - 1) x (heads x head_dim +
  2 x groups x d_state)``;
- Mamba-1 (Jamba): SSM ``expand x hidden x d_state`` plus conv ``(d_conv - 1) x expand x
  hidden``. The SSM state uses ``mamba_ssm_cache_dtype`` (``mamba_ssm_dtype``) when the
  config sets it, else vLLM's default: the model dtype (float32 for Nemotron-H).

Layers are grouped as vLLM's hybrid allocator groups them: one bucket per kind
(and window), group size = the smallest bucket (the largest when it is under 1.5x
the smallest), group i of a bucket holding its layers ``i::n``. Chunks are
``chunk_tokens`` (256) tokens, one block per chunk, like ``hybridkv.sim.layouts``.

Invariant: a config that does not say enough raises ``HFConfigError`` naming the
field and the file; nothing is guessed silently except the documented defaults.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hybridkv.cost import PrefillCost
from hybridkv.groups import GroupKind, GroupSpec, HybridLayout
from hybridkv.sim.layouts import CHUNK_TOKENS, SimModel

__all__ = ["HFConfigError", "layer_kinds", "sim_model_from_hf_config", "load_hf_config"]

_DTYPE_BYTES = {"float32": 4, "float": 4, "fp32": 4, "bfloat16": 2, "float16": 2, "half": 2,
                "fp16": 2, "bf16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1, "fp8": 1}
_FULL = ("full_attention", "attention", "global_attention", "*")
_SLIDING = ("sliding_attention", "sliding_window", "local_attention")
_CHUNKED = ("chunked_attention",)
_STATE = ("linear_attention", "mamba", "mamba2", "M")
_NONE = ("mlp", "moe", "-", "E")
_PATTERN = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}


class HFConfigError(ValueError):
    """A config.json hybridkv cannot derive a layout from; the message names the field."""


def load_hf_config(path: str | os.PathLike) -> dict:
    """The JSON object of ``path`` (a config.json, or a directory holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        doc = json.loads(p.read_text())
    except OSError as exc:
        raise HFConfigError(f"{os.fspath(path)}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise HFConfigError(f"{p}: not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise HFConfigError(f"{p}: not a JSON object")
    return doc


def _text_config(cfg: Mapping[str, Any]) -> dict:
    """The language model's fields: ``text_config`` (multimodal wrappers) over the top level."""
    text = cfg.get("text_config")
    if isinstance(text, dict):
        merged = {k: v for k, v in cfg.items() if k != "text_config"}
        merged.update(text)
        return merged
    return dict(cfg)


class _Fields:
    def __init__(self, cfg: Mapping[str, Any], where: str):
        self.cfg, self.where = cfg, where

    def get(self, *names: str, default: Any = None) -> Any:
        for n in names:
            if self.cfg.get(n) is not None:
                return self.cfg[n]
        return default

    def int(self, *names: str, default: int | None = None) -> int:
        value = self.get(*names, default=default)
        if value is None:
            raise HFConfigError(f"{self.where}: missing {' / '.join(repr(n) for n in names)}")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise HFConfigError(f"{self.where}: {names[0]!r} must be a positive integer, "
                                f"got {value!r}")
        return value


def layer_kinds(cfg: Mapping[str, Any], where: str = "config.json") -> list[str]:
    """Per layer: ``full`` | ``sliding`` | ``chunked`` | ``state`` | ``none``."""
    f = _Fields(cfg, where)
    model_type = str(cfg.get("model_type", ""))
    raw: list[str] | None = None
    for name in ("layer_types", "layers_block_type"):
        value = cfg.get(name)
        if value is not None:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise HFConfigError(f"{where}: {name!r} must be a list of strings")
            raw = value
            break
    if raw is None and cfg.get("hybrid_override_pattern") is not None:
        pattern = cfg["hybrid_override_pattern"]
        if not isinstance(pattern, str) or set(pattern) - set(_PATTERN):
            raise HFConfigError(f"{where}: 'hybrid_override_pattern' must use only "
                                f"{''.join(_PATTERN)}, got {pattern!r}")
        raw = [_PATTERN[c] for c in pattern]
    if raw is None:
        n = f.int("num_hidden_layers")
        if cfg.get("attn_layer_indices") is not None:
            idx = cfg["attn_layer_indices"]
            if not isinstance(idx, list) or not all(isinstance(i, int) and 0 <= i < n for i in idx):
                raise HFConfigError(f"{where}: 'attn_layer_indices' must list layers in "
                                    f"[0, {n}), got {idx!r}")
            raw = ["attention" if i in set(idx) else "mamba" for i in range(n)]
        elif cfg.get("attn_layer_period") is not None or model_type == "jamba":
            period, offset = f.int("attn_layer_period", default=8), f.get("attn_layer_offset",
                                                                           default=4)
            raw = ["attention" if i % period == offset else "mamba" for i in range(n)]
        elif model_type.startswith("gemma3"):
            every = f.int("sliding_window_pattern", default=6)
            raw = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)]
        elif model_type in ("qwen3_next", "qwen3_5", "qwen3_5_text"):
            every = f.int("full_attention_interval", default=4)
            raw = ["linear_attention" if (i + 1) % every else "full_attention" for i in range(n)]
        elif model_type == "gpt_oss":
            raw = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
        else:
            raw = ["full_attention"] * n
    n = cfg.get("num_hidden_layers")
    if isinstance(n, int) and cfg.get("hybrid_override_pattern") is None and len(raw) != n:
        raise HFConfigError(f"{where}: {len(raw)} layer types for num_hidden_layers={n}")
    kinds = []
    for i, t in enumerate(raw):
        if t in _FULL:
            kinds.append("full")
        elif t in _SLIDING:
            kinds.append("sliding")
        elif t in _CHUNKED:
            kinds.append("chunked")
        elif t in _STATE:
            kinds.append("state")
        elif t in _NONE:
            kinds.append("none")
        else:
            raise HFConfigError(f"{where}: layer {i} has type {t!r}, which hybridkv does not "
                                "know (expected attention, sliding, linear/mamba, mlp or moe)")
    if not any(k != "none" for k in kinds):
        raise HFConfigError(f"{where}: no layer keeps a KV cache or state")
    return kinds


def _dtype_bytes(value: Any, where: str, name: str) -> int:
    text = str(value).removeprefix("torch.")
    if text not in _DTYPE_BYTES:
        raise HFConfigError(f"{where}: {name} {value!r} is not a dtype hybridkv knows "
                            f"({', '.join(sorted(_DTYPE_BYTES))})")
    return _DTYPE_BYTES[text]


def _state_bytes(f: _Fields, model_type: str, dt: int, ssm_dt: int) -> int:
    """Bytes of one layer's recurrent state (plus conv state) at one position."""
    cfg = f.cfg
    if cfg.get("linear_key_head_dim") is not None or model_type.startswith(("qwen3_next",
                                                                            "qwen3_5")):
        hk, hv = f.int("linear_num_key_heads"), f.int("linear_num_value_heads")
        dk, dv = f.int("linear_key_head_dim"), f.int("linear_value_head_dim")
        kernel = f.int("linear_conv_kernel_dim", default=4)
        return hv * dk * dv * ssm_dt + (kernel - 1) * (2 * hk * dk + hv * dv) * dt
    hidden = f.int("hidden_size")
    d_state = f.int("mamba_d_state", "ssm_state_size", "state_size")
    d_conv = f.int("mamba_d_conv", "conv_kernel", default=4)
    expand = f.int("mamba_expand", "expand", default=2)
    heads = f.get("mamba_n_heads", "mamba_num_heads")
    if heads is None and model_type not in ("jamba", "mamba"):
        raise HFConfigError(f"{f.where}: a Mamba-2 state needs 'mamba_n_heads' or "
                            "'mamba_num_heads'")
    if heads is None:  # Mamba-1
        inner = expand * hidden
        return inner * d_state * ssm_dt + (d_conv - 1) * inner * dt
    heads = f.int("mamba_n_heads", "mamba_num_heads")
    head_dim = f.get("mamba_d_head", "mamba_head_dim", default="auto")
    head_dim = expand * hidden // heads if head_dim == "auto" else f.int("mamba_d_head",
                                                                        "mamba_head_dim")
    groups = f.int("mamba_n_groups", "n_groups", default=1)
    inner = heads * head_dim
    return inner * d_state * ssm_dt + (d_conv - 1) * (inner + 2 * groups * d_state) * dt


def _group_layers(buckets: list[tuple[tuple, list[int]]]) -> list[tuple[tuple, list[int]]]:
    """vLLM's split of same-spec layer buckets into equal-size groups."""
    sizes = [len(layers) for _, layers in buckets]
    size = min(sizes)
    if max(sizes) < size * 1.5:
        size = max(sizes)
    out = []
    for spec, layers in buckets:
        n = -(-len(layers) // size)
        out += [(spec, layers[i::n]) for i in range(n)]
    return out


def _label(raw: Mapping[str, Any], config: object) -> str:
    """The config's ``_name_or_path``, else its directory's name, else its model_type."""
    if raw.get("_name_or_path"):
        return str(raw["_name_or_path"])
    if not isinstance(config, Mapping):
        p = Path(config)
        folder = p if p.is_dir() else p.parent
        if folder.name:
            return folder.name
    return str(raw.get("model_type") or "hf_model")


def sim_model_from_hf_config(config: Mapping[str, Any] | str | os.PathLike, *,
                             name: str | None = None,
                             chunk_tokens: int = CHUNK_TOKENS) -> SimModel:
    """The ``SimModel`` of a Hugging Face config (a dict, a config.json or its directory)."""
    if isinstance(config, Mapping):
        raw, where = dict(config), "config"
    else:
        raw = load_hf_config(config)
        where = os.fspath(config)
    cfg = _text_config(raw)
    f = _Fields(cfg, where)
    model_type = str(cfg.get("model_type", ""))
    kinds = layer_kinds(cfg, where)
    dtype = str(f.get("torch_dtype", "dtype", default="bfloat16")).removeprefix("torch.")
    dt = _dtype_bytes(dtype, where, "torch_dtype")
    ssm = f.get("mamba_ssm_cache_dtype", "mamba_ssm_dtype")
    if ssm in (None, "auto"):  # vLLM's default: the model dtype, fp32 for Nemotron-H
        ssm = "float32" if model_type.startswith("nemotron_h") else dtype
    ssm_dt = _dtype_bytes(ssm, where, "mamba_ssm_cache_dtype")
    hidden = f.int("hidden_size")
    buckets: dict[tuple, list[int]] = {}
    for i, kind in enumerate(kinds):
        if kind == "none":
            continue
        if kind in ("full", "sliding", "chunked"):
            heads = f.int("num_attention_heads")
            kv = f.int("num_key_value_heads", default=heads)
            head_dim = f.int("head_dim", default=hidden // heads)
            page = 2 * kv * head_dim * dt * chunk_tokens
            window = None
            if kind == "sliding":
                window = f.int("sliding_window")
            elif kind == "chunked":
                window = f.int("attention_chunk_size")
            spec = (GroupKind.FULL if kind == "full" else GroupKind.SLIDING, page, window)
        else:
            spec = (GroupKind.STATE, _state_bytes(f, model_type, dt, ssm_dt), None)
        buckets.setdefault(spec, []).append(i)
    groups = []
    for index, ((kind, page, window), layers) in enumerate(_group_layers(list(buckets.items()))):
        groups.append(GroupSpec(index=index, kind=kind, block_tokens=chunk_tokens,
                                chunk_tokens=chunk_tokens,
                                layer_names=tuple(f"layers.{i}" for i in layers),
                                page_bytes=page, dtype=dtype, window_tokens=window))
    label = name or _label(raw, config)
    layout = HybridLayout(model=label, dtype=dtype, groups=tuple(groups))
    counts = {k: kinds.count(k) for k in ("full", "sliding", "chunked", "state") if kinds.count(k)}
    description = (f"{label} from {where}: {len(kinds)} layers ("
                   + ", ".join(f"{v} {k}" for k, v in counts.items()) + f"), {len(groups)} groups")
    return SimModel(name=label, description=description, layout=layout,
                    cost=PrefillCost.from_layout(layout, hidden_size=hidden))
