"""What eviction costs as the store grows: one decision, and a whole replay.

1. One eviction decision at 10K, 100K and 1M stored chunks (``--quick``: 10K and
   100K): the index is filled with group-aware admission (unbounded), then the
   budget is set to what is stored and new requests of 16 chunks per group are
   offered one by one; each offer must evict about one request's worth.
   ``Capacity.offer`` is timed (admission, the victim search with whatever
   incremental upkeep it catches up on, reservations), median over the offers.
   The scan-based analysis the policy used before (kept as the test oracle) is
   timed at 10K for comparison.
2. A replay of the multi-turn trace (quick scale with ``--quick``, else full) at
   10% and 25% of its working set with group_aware and with lru: wall time ratio,
   and the eviction decisions taken with ``eviction_headroom`` 0 and the default.

    python benchmarks/policy_overhead.py --out FILE.json [--quick]

Targets: decision at the largest size <= 2x the decision at 10K; group_aware replay
<= 2x the lru replay (worst model x budget).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py, run or imported
from report import print_targets, save  # noqa: E402

from hybridkv.capacity import DEFAULT_HEADROOM, Capacity
from hybridkv.index import ChunkIndex
from hybridkv.keys import make_key
from hybridkv.policies import Candidate, RequestView, make_policy
from hybridkv.sim.layouts import SIM_MODELS, SimModel
from hybridkv.sim.replay import replay, working_set_bytes
from hybridkv.sim.traces import make_trace

ROOT = Path(__file__).resolve().parent.parent


def request(model: SimModel, rng: random.Random, systems: list[list[int]], n: int
            ) -> tuple[list[Candidate], RequestView]:
    """A new conversation: a shared system prompt, then fresh chunks (16 per group)."""
    layout = model.layout
    ids = rng.choice(systems) + [rng.getrandbits(64) for _ in range(16)]
    hashes = [hash(tuple(ids[:i + 1])).to_bytes(8, "big", signed=True) for i in range(len(ids))]
    batch, positions = [], {}
    for g in layout.groups:
        keys = [make_key(h, g.index) for h in hashes]
        for i, k in enumerate(keys):
            positions[k] = (i + 1) * g.chunk_tokens
            batch.append(Candidate(k, g.index, (i + 1) * g.chunk_tokens, g.chunk_bytes,
                                   keys[i - 1] if i else None))
    return batch, RequestView(f"r{n}", positions, len(ids) * layout.groups[0].chunk_tokens + 7)


def offer(cap: Capacity, batch: list[Candidate], view: RequestView) -> tuple[float, int]:
    """Offer one request's chunks; seconds in ``Capacity.offer`` and chunks it evicted."""
    fresh = [c for c in batch if c.key not in cap.index]
    t = time.perf_counter()
    plan = cap.offer(fresh, view)
    took = time.perf_counter() - t
    evicted = len(plan.evicted)
    for cand in plan.admitted:
        evicted += len(cap.commit(cand.key, size=cand.size, position=cand.position,
                                  parent=cand.parent))
    cap.request_finished(view.request_id)
    return took, evicted


def decision_cost(model: SimModel, chunks: int, offers: int, seed: int = 0,
                  scan_too: bool = False) -> dict:
    rng = random.Random(seed)
    systems = [[rng.getrandbits(64) for _ in range(rng.randint(2, 6))] for _ in range(8)]
    index = ChunkIndex()
    policy = make_policy("group_aware", model.layout, cost=model.cost)
    fill = Capacity(index, policy, None)
    t = time.perf_counter()
    n = 0
    while len(index) < chunks:
        offer(fill, *request(model, rng, systems, n))
        n += 1
    fill_s = time.perf_counter() - t
    # what a restarted engine does once, at its first decision: build the hit points
    fresh = make_policy("group_aware", model.layout, cost=model.cost)
    t = time.perf_counter()
    built = fresh.tracker(index)  # type: ignore[attr-defined]
    build_s = time.perf_counter() - t
    index.unsubscribe(built)  # only timed: it must not follow the offers below
    policy.tracker(index)  # type: ignore[attr-defined]
    cap = Capacity(index, policy, index.bytes_used, headroom=0.0)
    times, evicted = [], []
    for i in range(offers):
        took, ev = offer(cap, *request(model, rng, systems, n + i))
        times.append(took)
        evicted.append(ev)
    row = {"model": model.name, "chunks": len(index), "fill_s": fill_s,
           "fill_us_per_chunk": fill_s * 1e6 / len(index), "offers": offers,
           "policy_build_s": build_s, "policy_build_us_per_chunk": build_s * 1e6 / len(index),
           "decision_ms_median": statistics.median(times) * 1e3,
           "decision_ms_mean": statistics.fmean(times) * 1e3,
           "decision_ms_max": max(times) * 1e3,
           "evicted_per_decision": statistics.fmean(evicted)}
    if scan_too:
        sys.path.insert(0, str(ROOT / "tests"))
        from scan_group_aware import GroupAwarePolicy as ScanPolicy

        scan = ScanPolicy(model.layout, cost=model.cost)
        t = time.perf_counter()
        scan.victims(index, max(1, sum(c.size for c in request(model, rng, systems, -1)[0])))
        row["scan_decision_ms"] = (time.perf_counter() - t) * 1e3
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default="gemma3_27b,jamba_mini",
                    help="comma-separated simulator layouts (default gemma3_27b,jamba_mini)")
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in SIM_MODELS:
            ap.error(f"--models: unknown layout {m!r}; choose from {', '.join(SIM_MODELS)}")
    sizes = (10_000, 100_000) if args.quick else (10_000, 100_000, 1_000_000)
    started = time.perf_counter()

    scaling = []
    for name in models:
        model = SIM_MODELS[name]
        for size in sizes:
            row = decision_cost(model, size, offers=30, scan_too=size == sizes[0])
            scaling.append(row)
            scan = (f"; scan-based analysis {row['scan_decision_ms']:.1f} ms"
                    if "scan_decision_ms" in row else "")
            print(f"{name:15s} {row['chunks']:>9,} chunks: decision "
                  f"{row['decision_ms_median']:.2f} ms median ({row['decision_ms_max']:.2f} max, "
                  f"{row['evicted_per_decision']:.0f} chunks evicted each){scan}; "
                  f"fill {row['fill_us_per_chunk']:.0f} us/chunk; hit points built from the "
                  f"index (first decision after a restart) {row['policy_build_s']:.2f} s",
                  flush=True)

    trace = make_trace("multi_turn", scale="quick" if args.quick else "full")
    replays = []
    for name in models:
        model = SIM_MODELS[name]
        ws = working_set_bytes(trace, model)
        for fraction in (0.10, 0.25):
            budget = int(ws * fraction)
            lru = replay(trace, model, "lru", budget, budget_fraction=fraction)
            ga = replay(trace, model, "group_aware", budget, budget_fraction=fraction)
            none = replay(trace, model, "group_aware", budget, budget_fraction=fraction,
                          headroom=0.0)
            row = {"model": name, "trace": trace.name, "requests": len(trace.requests),
                   "budget_fraction": fraction, "lru_s": lru.wall_s, "group_aware_s": ga.wall_s,
                   "time_ratio": ga.wall_s / max(1e-9, lru.wall_s),
                   "hit_rate_lru": lru.token_hit_rate, "hit_rate_group_aware": ga.token_hit_rate,
                   "victim_calls_default": ga.victim_calls,
                   "victim_calls_no_headroom": none.victim_calls,
                   "hit_rate_no_headroom": none.token_hit_rate,
                   "group_aware_no_headroom_s": none.wall_s}
            replays.append(row)
            print(f"{name:15s} multi_turn @{fraction:.0%} ({row['requests']} requests): "
                  f"group_aware {ga.wall_s:.2f} s vs lru {lru.wall_s:.2f} s "
                  f"= {row['time_ratio']:.2f}x; eviction decisions {none.victim_calls} -> "
                  f"{ga.victim_calls} with headroom {DEFAULT_HEADROOM} (hit rate "
                  f"{none.token_hit_rate:.4f} -> {ga.token_hit_rate:.4f})", flush=True)

    targets = {}
    for name in models:
        rows = [r for r in scaling if r["model"] == name]
        small, large = rows[0], rows[-1]
        ratio = large["decision_ms_median"] / max(1e-9, small["decision_ms_median"])
        targets[f"decision_{large['chunks'] // 1000}k_vs_10k_{name}"] = {
            "figure": round(ratio, 2), "goal": "<= 2.0", "met": ratio <= 2.0,
            "small_ms": small["decision_ms_median"], "large_ms": large["decision_ms_median"]}
    worst = max(replays, key=lambda r: r["time_ratio"])
    targets["replay_group_aware_vs_lru"] = {
        "figure": round(worst["time_ratio"], 2), "goal": "<= 2.0",
        "met": worst["time_ratio"] <= 2.0,
        "worst_cell": f"{worst['model']} @{worst['budget_fraction']:.0%} ({worst['trace']})"}
    print_targets(targets)
    return save(args.out, "policy_overhead", quick=args.quick, started=started,
                decisions=scaling, replays=replays, targets=targets)

if __name__ == "__main__":
    main()
