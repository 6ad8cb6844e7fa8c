"""Simulator layouts from Hugging Face config.json files (hybridkv.sim.hf_layout).

The configs are written here with the fields the real models' config.json files
carry. Layer kinds are checked against transformers' own config classes (which
derive layer types from the same fields), state sizes against vLLM's
MambaStateShapeCalculator, and grouping against vLLM's rule.
"""

from __future__ import annotations

import json

import pytest

from hybridkv.groups import GroupKind
from hybridkv.sim.hf_layout import HFConfigError, layer_kinds, sim_model_from_hf_config
from hybridkv.sim.layouts import SIM_MODELS

pytestmark = pytest.mark.fast

GEMMA3_27B = {  # google/gemma-3-27b-it (multimodal wrapper; text fields nested)
    "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
    "torch_dtype": "bfloat16",
    "text_config": {"model_type": "gemma3_text", "hidden_size": 5376,
                    "intermediate_size": 21504, "num_hidden_layers": 62,
                    "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 128,
                    "sliding_window": 1024, "sliding_window_pattern": 6,
                    "query_pre_attn_scalar": 168, "rope_theta": 1000000.0,
                    "vocab_size": 262208},
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152},
}
GEMMA3_1B = {  # google/gemma-3-1b-it: text only, explicit layer_types (newer exports)
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "dtype": "bfloat16",
    "hidden_size": 1152, "num_hidden_layers": 26, "num_attention_heads": 4,
    "num_key_value_heads": 1, "head_dim": 256, "sliding_window": 512,
    "layer_types": ["sliding_attention" if (i + 1) % 6 else "full_attention"
                    for i in range(26)],
}
QWEN3_NEXT = {  # Qwen/Qwen3-Next-80B-A3B-Instruct
    "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next",
    "torch_dtype": "bfloat16", "hidden_size": 2048, "num_hidden_layers": 48,
    "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
    "full_attention_interval": 4, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
    "linear_value_head_dim": 128, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
    "num_experts": 512, "num_experts_per_tok": 10,
}
JAMBA_MINI = {  # ai21labs/AI21-Jamba-Mini-1.5
    "architectures": ["JambaForCausalLM"], "model_type": "jamba", "torch_dtype": "bfloat16",
    "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "attn_layer_period": 8, "attn_layer_offset": 4,
    "expert_layer_period": 2, "expert_layer_offset": 1, "mamba_d_state": 16,
    "mamba_d_conv": 4, "mamba_expand": 2, "mamba_dt_rank": 256,
}
GRANITE_4_H = {  # ibm-granite/granite-4.0-h-small: layer_types with the legacy names
    "architectures": ["GraniteMoeHybridForCausalLM"], "model_type": "granitemoehybrid",
    "torch_dtype": "bfloat16", "hidden_size": 4096, "num_hidden_layers": 40,
    "num_attention_heads": 32, "num_key_value_heads": 8,
    "layer_types": ["attention" if i in (5, 15, 25, 35) else "mamba" for i in range(40)],
    "mamba_n_heads": 128, "mamba_d_head": 64, "mamba_d_state": 128, "mamba_n_groups": 1,
    "mamba_d_conv": 4, "mamba_expand": 2, "mamba_chunk_size": 256,
}
NEMOTRON_H = {  # nvidia/Nemotron-H-8B-Base-8K
    "architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h",
    "torch_dtype": "bfloat16", "hidden_size": 4096, "num_hidden_layers": 52,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "hybrid_override_pattern": "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
    "mamba_num_heads": 128, "mamba_head_dim": 64, "ssm_state_size": 128, "n_groups": 8,
    "conv_kernel": 4, "expand": 2,
}
GPT_OSS_20B = {  # openai/gpt-oss-20b
    "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "torch_dtype": "bfloat16",
    "hidden_size": 2880, "num_hidden_layers": 24, "num_attention_heads": 64,
    "num_key_value_heads": 8, "head_dim": 64, "sliding_window": 128,
    "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(24)],
    "num_local_experts": 32, "experts_per_token": 4,
}
BAMBA = {  # ibm-ai-platform/Bamba-9B
    "architectures": ["BambaForCausalLM"], "model_type": "bamba", "torch_dtype": "bfloat16",
    "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "attn_layer_indices": [9, 18, 27], "mamba_n_heads": 128,
    "mamba_d_head": "auto", "mamba_d_state": 128, "mamba_n_groups": 1, "mamba_d_conv": 4,
    "mamba_expand": 2,
}

CONFIGS = {"gemma3_27b": GEMMA3_27B, "gemma3_1b": GEMMA3_1B, "qwen3_next": QWEN3_NEXT,
           "jamba": JAMBA_MINI, "granite_4_h": GRANITE_4_H, "nemotron_h": NEMOTRON_H,
           "gpt_oss": GPT_OSS_20B, "bamba": BAMBA}


def write(tmp_path, name, cfg):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return d / "config.json"


def kinds_of(model):
    return [(g.kind, len(g.layer_names), g.window_tokens) for g in model.layout.groups]


def layers_of(model, kind):
    return sorted(int(n.split(".")[1]) for g in model.layout.groups if g.kind is kind
                  for n in g.layer_names)


# ------------------------------------------------------------ layer kinds vs transformers
def _transformers_types(name, cfg):
    """Per layer 'full' | 'sliding' | 'state' | 'none' as transformers derives them."""
    import transformers as tf

    text = dict(cfg.get("text_config", cfg))
    text = {k: v for k, v in text.items() if k not in ("architectures",)}
    cls = {"gemma3_27b": tf.Gemma3TextConfig, "gemma3_1b": tf.Gemma3TextConfig,
           "qwen3_next": tf.Qwen3NextConfig, "jamba": tf.JambaConfig,
           "granite_4_h": tf.GraniteMoeHybridConfig, "nemotron_h": tf.NemotronHConfig,
           "gpt_oss": tf.GptOssConfig, "bamba": tf.BambaConfig}[name]
    conf = cls(**{k: v for k, v in text.items() if k != "model_type"})
    types = getattr(conf, "layers_block_type", None) or conf.layer_types
    mapping = {"full_attention": "full", "attention": "full", "sliding_attention": "sliding",
               "linear_attention": "state", "mamba": "state", "mlp": "none", "moe": "none"}
    return [mapping[t] for t in types]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_layer_kinds_match_transformers(name):
    cfg = CONFIGS[name]
    text = dict(cfg.get("text_config", cfg))
    text.setdefault("model_type", cfg["model_type"])
    assert layer_kinds(text) == _transformers_types(name, cfg)


# ------------------------------------------------------------ per model
def test_gemma3_27b_nested_text_config(tmp_path):
    m = sim_model_from_hf_config(write(tmp_path, "gemma-3-27b-it", GEMMA3_27B))
    assert m.name == "gemma-3-27b-it"
    assert layers_of(m, GroupKind.FULL) == [5, 11, 17, 23, 29, 35, 41, 47, 53, 59]
    # vLLM: group size = 10 (the full bucket); 52 sliding layers -> 6 groups, i::6 each
    assert kinds_of(m) == ([(GroupKind.SLIDING, n, 1024) for n in (9, 9, 9, 9, 8, 8)]
                           + [(GroupKind.FULL, 10, None)])
    # the same KV bytes per token per layer as the hand-built preset (16 KV heads x 128, bf16)
    preset = SIM_MODELS["gemma3_27b"].layout.groups[0]
    assert {g.page_bytes for g in m.layout.groups} == {preset.page_bytes}
    assert sum(g.chunk_bytes for g in m.layout.groups) == 62 * 2 * 16 * 128 * 2 * 256


def test_gemma3_1b_layer_types(tmp_path):
    m = sim_model_from_hf_config(write(tmp_path, "g1b", GEMMA3_1B))
    assert layers_of(m, GroupKind.FULL) == [5, 11, 17, 23]
    assert all(g.window_tokens == 512 for g in m.layout.groups if g.kind is GroupKind.SLIDING)
    assert {g.page_bytes for g in m.layout.groups} == {2 * 1 * 256 * 2 * 256}


def test_qwen3_next_matches_vllm_gated_delta_net_state(tmp_path):
    from vllm.model_executor.layers.mamba.mamba_utils import MambaStateShapeCalculator as C

    m = sim_model_from_hf_config(write(tmp_path, "qn", QWEN3_NEXT))
    assert layers_of(m, GroupKind.FULL) == list(range(3, 48, 4))
    assert kinds_of(m) == [(GroupKind.STATE, 12, None)] * 3 + [(GroupKind.FULL, 12, None)]
    conv, ssm = C.gated_delta_net_state_shape(1, 16, 32, 128, 128, 4)
    expected = (conv[0] * conv[1] + ssm[0] * ssm[1] * ssm[2]) * 2
    state = [g for g in m.layout.groups if g.kind is GroupKind.STATE]
    assert {g.page_bytes for g in state} == {expected}
    assert expected == SIM_MODELS["qwen3_next_80b"].layout.groups[1].page_bytes


def test_jamba_period_offset_and_ssm_dtype(tmp_path):
    from vllm.model_executor.layers.mamba.mamba_utils import MambaStateShapeCalculator as C

    m = sim_model_from_hf_config(write(tmp_path, "jamba", JAMBA_MINI))
    assert layers_of(m, GroupKind.FULL) == [4, 12, 20, 28]
    assert kinds_of(m) == [(GroupKind.STATE, 4, None)] * 7 + [(GroupKind.FULL, 4, None)]
    conv, ssm = C.mamba1_state_shape(1, 2 * 4096, 16, 4)
    state = {g.page_bytes for g in m.layout.groups if g.kind is GroupKind.STATE}
    assert state == {(conv[0] * conv[1] + ssm[0] * ssm[1]) * 2}  # vLLM's default: model dtype
    fp32 = sim_model_from_hf_config(dict(JAMBA_MINI, mamba_ssm_cache_dtype="float32"))
    expected = conv[0] * conv[1] * 2 + ssm[0] * ssm[1] * 4  # bf16 conv, fp32 SSM
    assert {g.page_bytes for g in fp32.layout.groups if g.kind is GroupKind.STATE} == {expected}
    assert expected == SIM_MODELS["jamba_mini"].layout.groups[1].page_bytes  # the preset's


@pytest.mark.parametrize("name,cfg,heads,head_dim,groups,ssm_bytes", [
    ("granite", GRANITE_4_H, 128, 64, 1, 2),
    ("nemotron", NEMOTRON_H, 128, 64, 8, 4),  # vLLM keeps Nemotron-H's SSM state in fp32
    ("bamba", BAMBA, 128, 64, 1, 2),  # mamba_d_head "auto": 2 x 4096 / 128
])
def test_mamba2_state_matches_vllm(tmp_path, name, cfg, heads, head_dim, groups, ssm_bytes):
    from vllm.model_executor.layers.mamba.mamba_utils import MambaStateShapeCalculator as C

    m = sim_model_from_hf_config(write(tmp_path, name, cfg))
    d_state = cfg.get("mamba_d_state", cfg.get("ssm_state_size"))
    conv, ssm = C.mamba2_state_shape(1, heads * head_dim, groups, heads, head_dim, d_state, 4)
    expected = conv[0] * conv[1] * 2 + ssm[0] * ssm[1] * ssm[2] * ssm_bytes
    state = [g for g in m.layout.groups if g.kind is GroupKind.STATE]
    assert state and {g.page_bytes for g in state} == {expected}
    full = layers_of(m, GroupKind.FULL)
    assert full == [i for i, k in enumerate(layer_kinds(cfg)) if k == "full"]
    assert len(full) == len([g for g in m.layout.groups if g.kind is GroupKind.FULL]) * len(
        [g for g in m.layout.groups if g.kind is GroupKind.FULL][0].layer_names)


def test_nemotron_h_pattern_skips_mlp_layers(tmp_path):
    m = sim_model_from_hf_config(write(tmp_path, "nh", NEMOTRON_H))
    pattern = NEMOTRON_H["hybrid_override_pattern"]
    assert layers_of(m, GroupKind.FULL) == [i for i, c in enumerate(pattern) if c == "*"]
    assert layers_of(m, GroupKind.STATE) == [i for i, c in enumerate(pattern) if c == "M"]
    cached = sum(len(g.layer_names) for g in m.layout.groups)
    assert cached == pattern.count("*") + pattern.count("M") < len(pattern)


def test_gpt_oss_equal_buckets_one_group_each(tmp_path):
    m = sim_model_from_hf_config(write(tmp_path, "gpt-oss-20b", GPT_OSS_20B))
    # 12 sliding + 12 full: one group of 12 each; window 128 < one 256-token chunk
    assert kinds_of(m) == [(GroupKind.SLIDING, 12, 128), (GroupKind.FULL, 12, None)]
    assert m.layout.groups[0].window_chunks == 1
    assert {g.page_bytes for g in m.layout.groups} == {2 * 8 * 64 * 2 * 256}


def test_group_size_uses_larger_bucket_under_one_and_a_half():
    # vLLM pads 12 sliding + 13 full to groups of 13 (not 12 + 2 x 12)
    cfg = dict(GPT_OSS_20B, num_hidden_layers=25,
               layer_types=GPT_OSS_20B["layer_types"] + ["full_attention"])
    assert kinds_of(sim_model_from_hf_config(cfg)) == [(GroupKind.SLIDING, 12, 128),
                                                       (GroupKind.FULL, 13, None)]


# ------------------------------------------------------------ bad configs
@pytest.mark.parametrize("change,needle", [
    ({"layer_types": ["full_attention", "weird_attention"], "num_hidden_layers": 2},
     "'weird_attention'"),
    ({"layer_types": ["full_attention"] * 3, "num_hidden_layers": 4}, "num_hidden_layers=4"),
    ({"num_key_value_heads": 0}, "'num_key_value_heads'"),
    ({"sliding_window": None}, "'sliding_window'"),
    ({"torch_dtype": "int3"}, "'int3'"),
    ({"hidden_size": None}, "'hidden_size'"),
])
def test_bad_config_names_the_field(change, needle):
    cfg = {k: v for k, v in {**GPT_OSS_20B, **change}.items() if v is not None}
    with pytest.raises(HFConfigError, match=needle.replace("[", r"\[")):
        sim_model_from_hf_config(cfg)


def test_unreadable_and_non_json(tmp_path):
    with pytest.raises(HFConfigError, match="cannot read"):
        sim_model_from_hf_config(tmp_path / "missing.json")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(HFConfigError, match="not JSON"):
        sim_model_from_hf_config(tmp_path)  # a directory holding config.json
