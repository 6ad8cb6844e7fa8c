"""Routing a fleet in the simulator: hybrid-aware vs full-attention-only vs round-robin.

N replicas (default 4), each with its own hybridkv disk tier (group_aware
eviction, a budget of ``fraction x working set / N`` bytes), behind one router
(``hybridkv.sim.routing``). Per trace x layout x router x budget: token hit
rate, tokens promised but not served, over-promising requests, load imbalance
(busiest replica's prefill tokens computed / mean).

Targets:
- ``hybrid_aware_promised_not_served``: tokens the hybrid-aware router promised
  and the replica did not serve, over every cell: 0;
- ``hybrid_aware_vs_full_attention_only`` / ``hybrid_aware_vs_round_robin``:
  the worst cell's hit-rate ratio (same trace, layout and budget, same run) >= 1.0.
The full-attention-only router's over-promise is reported next to them.

    python benchmarks/routing.py --out FILE.json [--quick] [--replicas N]

--quick: quick traces, budget fraction 0.1 (about a minute); default: also
0.25 and 1.0 (three times as long).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py, run or imported
from report import print_targets, save  # noqa: E402

from hybridkv.sim.layouts import SIM_MODELS  # noqa: E402
from hybridkv.sim.replay import working_set_bytes  # noqa: E402
from hybridkv.sim.routing import ROUTERS, replay_fleet, summarize  # noqa: E402
from hybridkv.sim.traces import GENERATORS, make_trace  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--fractions", default=None, help="comma-separated fleet budget fractions")
    args = p.parse_args(argv)
    if args.replicas <= 0:
        p.error(f"--replicas must be positive, got {args.replicas}")
    started = time.perf_counter()
    fractions = ([float(f) for f in args.fractions.split(",")] if args.fractions
                 else [0.1] if args.quick else [0.1, 0.25, 1.0])
    cells = []
    print(f"{'trace':14s} {'layout':15s} {'budget':>6s} {'router':20s} {'hit':>6s} "
          f"{'promised-not-served':>20s} {'over-req':>8s} {'imbalance':>9s}")
    for tname in GENERATORS:
        trace = make_trace(tname, scale="quick")
        for model in SIM_MODELS.values():
            ws = working_set_bytes(trace, model)
            for frac in fractions:
                budget = int(ws * frac / args.replicas)
                for router in ROUTERS:
                    r = replay_fleet(trace, model, router, replicas=args.replicas, budget=budget)
                    cells.append({"budget_fraction": frac, **{k: getattr(r, k) for k in
                                                             r.__struct_fields__}})
                    print(f"{tname:14s} {model.name:15s} {frac:6.2f} {router:20s} "
                          f"{r.token_hit_rate:6.3f} {r.promised_not_served:20d} "
                          f"{r.overpromised_requests:8d} {r.load_imbalance:9.2f}", flush=True)

    def ratio_worst(other: str) -> tuple[float, str]:
        worst, where = float("inf"), ""
        for c in cells:
            if c["router"] != "hybrid_aware":
                continue
            o = next(x for x in cells if x["router"] == other and x["trace"] == c["trace"]
                     and x["model"] == c["model"] and x["budget_fraction"] == c["budget_fraction"])
            ratio = (c["token_hit_rate"] / o["token_hit_rate"] if o["token_hit_rate"]
                     else (1.0 if c["token_hit_rate"] == 0 else float("inf")))
            if ratio < worst:
                worst, where = ratio, f"{c['trace']}/{c['model']}/{c['budget_fraction']}"
        return worst, where

    from hybridkv.sim.routing import FleetResult
    summary = summarize([FleetResult(**{k: c[k] for k in FleetResult.__struct_fields__})
                         for c in cells])
    over = summary["hybrid_aware"]["promised_not_served"]
    targets = {"hybrid_aware_promised_not_served": {
        "figure": over, "goal": "0", "met": over == 0,
        "full_attention_only_figure": summary["full_attention_only"]["promised_not_served"]}}
    for other in ("full_attention_only", "round_robin"):
        worst, where = ratio_worst(other)
        targets[f"hybrid_aware_vs_{other}"] = {"figure": round(worst, 3), "goal": ">= 1.0",
                                               "met": worst >= 1.0, "worst_cell": where}
    print("summary: " + "; ".join(
        f"{name}: hit {s['token_hit_rate']:.3f}, promised-not-served "
        f"{int(s['promised_not_served'])} tokens in {int(s['overpromised_requests'])} requests, "
        f"worst imbalance {s['worst_load_imbalance']:.2f}" for name, s in summary.items()))
    print_targets(targets)
    save(Path(args.out), "routing", quick=args.quick, started=started, replicas=args.replicas,
         fractions=fractions, cells=cells, summary=summary, targets=targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
