"""Multi-replica simulation: the hybrid-aware router's promises hold; a full-attention-only one's do not."""

from __future__ import annotations

import pytest

from hybridkv.sim.layouts import SIM_MODELS
from hybridkv.sim.replay import replay, working_set_bytes
from hybridkv.sim.routing import ROUTERS, replay_fleet, summarize
from hybridkv.sim.traces import make_trace

@pytest.fixture(scope="module")
def doc_cells():
    trace = make_trace("document_qa", scale="quick")
    model = SIM_MODELS["jamba_mini"]
    budget = int(working_set_bytes(trace, model) * 0.1 / 4)
    return [replay_fleet(trace, model, r, replicas=4, budget=budget) for r in ROUTERS]


@pytest.mark.fast
def test_hybrid_aware_promises_exactly_what_it_serves(doc_cells):
    hybrid, full_only, rr = doc_cells
    assert hybrid.promised_not_served == 0 and hybrid.overpromised_requests == 0
    assert hybrid.promised_tokens == hybrid.hit_tokens > 0
    # the group-agnostic router counts full-attention chains whose states were evicted
    assert full_only.promised_not_served > 0 and full_only.promised_tokens > full_only.hit_tokens
    assert rr.promised_tokens == 0
    assert hybrid.token_hit_rate >= full_only.token_hit_rate > rr.token_hit_rate
    assert sum(hybrid.requests_per_replica) == hybrid.requests
    assert sum(rr.computed_per_replica) == rr.prompt_tokens - rr.hit_tokens
    assert max(rr.requests_per_replica) - min(rr.requests_per_replica) <= 1
    s = summarize(doc_cells)
    assert s["hybrid_aware"]["promised_not_served"] == 0


@pytest.mark.fast
def test_one_replica_is_the_single_engine_replay():
    trace = make_trace("multi_turn", scale="quick")
    model = SIM_MODELS["qwen3_next_80b"]
    budget = int(working_set_bytes(trace, model) * 0.1)
    fleet = replay_fleet(trace, model, "hybrid_aware", replicas=1, budget=budget)
    single = replay(trace, model, "group_aware", budget)
    assert fleet.hit_tokens == single.hit_tokens and fleet.load_imbalance == 1.0


@pytest.mark.fast
def test_bad_arguments():
    trace = make_trace("multi_turn", scale="quick")
    with pytest.raises(ValueError, match="sticky"):
        replay_fleet(trace, SIM_MODELS["jamba_mini"], "sticky")
    with pytest.raises(ValueError, match="0"):
        replay_fleet(trace, SIM_MODELS["jamba_mini"], "round_robin", replicas=0)


@pytest.mark.slow
def test_quick_benchmark_prints_its_targets(tmp_path):
    """benchmarks/routing.py --quick: one target line per JSON target, saying the same."""
    import json
    import re
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "routing.json"
    proc = subprocess.run([sys.executable, "benchmarks/routing.py", "--quick", "--out", str(out)],
                          cwd=repo, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    targets = json.loads(out.read_text())["targets"]
    lines = re.findall(r"^target (\S+): (.*) \(goal (.+?)\) (MET|MISSED)", proc.stdout, re.M)
    assert {name: status == "MET" for name, _, _, status in lines} == {
        name: t["met"] for name, t in targets.items()}
    assert targets["hybrid_aware_promised_not_served"]["figure"] == 0
