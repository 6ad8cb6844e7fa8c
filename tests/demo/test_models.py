"""Tiny hybrid model builder: layer layout, determinism, idempotence (no vLLM)."""

from __future__ import annotations

import json

import pytest

from hybridkv.demo.models import (
    MARKER_NAME,
    MODEL_KINDS,
    VLLM_ENGINE_KWARGS,
    build_tiny_model,
    default_model_dir,
)

pytestmark = pytest.mark.fast

VLLM_CPU_BLOCK = 128


def _config(path):
    return json.loads((path / "config.json").read_text())


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_build_layout_and_idempotence(kind, tmp_path):
    path = build_tiny_model(kind, tmp_path / kind)
    for name in ("config.json", "model.safetensors", "generation_config.json",
                 "tokenizer.json", "tokenizer_config.json", MARKER_NAME):
        assert (path / name).is_file(), name
    cfg = _config(path)
    types = cfg["layer_types"]
    assert len(types) == cfg["num_hidden_layers"]
    if kind == "gemma3":
        assert types.count("full_attention") >= 2
        assert types.count("sliding_attention") >= 2
        assert cfg["sliding_window"] > VLLM_CPU_BLOCK
    else:
        assert types.count("full_attention") >= 1
        assert types.count("linear_attention") >= 1
        assert cfg["linear_key_head_dim"] == cfg["linear_value_head_dim"] == 128
    assert not list(tmp_path.glob(".*tmp-*")), "temp build dir left behind"

    # Second call is a no-op: nothing rewritten.
    stamps = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    assert build_tiny_model(kind, path) == path
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == stamps


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_tokenizer_fits_vocab(kind, tmp_path):
    from transformers import AutoTokenizer

    path = build_tiny_model(kind, tmp_path / kind)
    tok = AutoTokenizer.from_pretrained(path)
    text = "hello wörld 123"
    ids = tok(text)["input_ids"]
    assert ids and max(ids) < _config(path)["vocab_size"]
    assert len(tok) <= _config(path)["vocab_size"]
    assert tok.decode(ids) == text


def test_deterministic_and_seed_sensitive(tmp_path):
    a = build_tiny_model("gemma3", tmp_path / "a", seed=0)
    b = build_tiny_model("gemma3", tmp_path / "b", seed=0)
    c = build_tiny_model("gemma3", tmp_path / "c", seed=1)
    wa, wb, wc = ((p / "model.safetensors").read_bytes() for p in (a, b, c))
    assert wa == wb
    assert wa != wc


def test_incomplete_or_other_build_is_replaced(tmp_path):
    path = tmp_path / "m"
    path.mkdir()
    (path / "junk").write_text("half a model")  # no marker: incomplete
    build_tiny_model("gemma3", path, seed=0)
    assert not (path / "junk").exists()
    first = (path / "model.safetensors").read_bytes()
    build_tiny_model("gemma3", path, seed=1)  # other seed: rebuilt
    assert json.loads((path / MARKER_NAME).read_text())["seed"] == 1
    assert (path / "model.safetensors").read_bytes() != first


def test_default_model_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HYBRIDKV_MODEL_CACHE", str(tmp_path))
    for kind in MODEL_KINDS:
        assert default_model_dir(kind).parent == tmp_path
        assert default_model_dir(kind).name.startswith(kind + "-v")
        assert VLLM_ENGINE_KWARGS[kind]["enable_prefix_caching"]
    with pytest.raises(ValueError):
        default_model_dir("llama")
