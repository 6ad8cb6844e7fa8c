"""Token hit rate of the capacity policies on simulated workloads, per hybrid model layout.

For each trace and each model layout the working set (every distinct chunk of
every group, i.e. what an unbounded store would hold) is measured, then every
policy (group_aware, lru, watermark) replays the trace under a budget of 10%,
25%, 50% and 100% of that working set, and the pseudo-policy "unbounded"
(no budget, store everything) gives the upper bound once per trace x model.
Replays are the simulator's (``hybridkv.sim.replay``): nothing is written to
disk, so these are hit rates and byte counts, not timings.

The "targets" section of the JSON (also printed at the end) evaluates, from
the cells measured in this same run: (a) group_aware / lru token hit rate on
multi_turn for gemma3_27b and jamba_mini at a 25% budget, against 2.0; (b)
group_aware >= lru at every trace x model x budget (violations listed with
their margin). Missed targets are reported, not hidden; the exit code is 0.

    python benchmarks/hit_rate.py --out hit_rate.json [--quick] [--traces a,b]
        [--models x,y] [--trace-file F.jsonl --block-tokens N] [--jobs N]

--quick uses the "quick" scale of the synthetic traces (150-300 requests each)
and still runs the whole grid: 4 traces x 3 models x (3 policies x 4 budgets
+ unbounded) = 156 replays, 35-50 s with --jobs 2 on a 2-core machine
(35 s idle, 46 s with another process busy), so no cells are dropped.
Without --quick the traces are the "full" scale (about 4x the requests); a
group_aware replay then takes about 10x as long as on the quick trace, so
expect several minutes with --jobs 2 on 2 cores.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from hybridkv.sim.layouts import SIM_MODELS
from hybridkv.sim.replay import replay, working_set_bytes
from hybridkv.sim.traces import GENERATORS, Trace, load_jsonl, make_trace

POLICIES = ("group_aware", "lru", "watermark")
UNBOUNDED = "unbounded"
BUDGET_FRACTIONS = (0.10, 0.25, 0.50, 1.00)
#: target (a): the issue's figure, group_aware / lru at this budget on these cells
RATIO_TARGET = {"trace": "multi_turn", "models": ("gemma3_27b", "jamba_mini"),
                "budget_fraction": 0.25, "min_ratio": 2.0}

# ----------------------------------------------------------------------------- traces


def _trace_spec(args: argparse.Namespace, name: str | None) -> tuple:
    """A picklable description of a trace, rebuilt (and cached) in each worker."""
    if args.trace_file:
        return ("file", str(Path(args.trace_file).resolve()), args.block_tokens,
                args.max_requests)
    return ("gen", name, "quick" if args.quick else "full", args.max_requests)


@functools.lru_cache(maxsize=8)
def _load_trace(spec: tuple) -> Trace:
    kind, what, arg, max_requests = spec
    if kind == "file":
        trace = load_jsonl(what, block_tokens=arg)
    else:
        trace = make_trace(what, scale=arg)
    if max_requests is not None:
        trace = Trace(name=trace.name, block_tokens=trace.block_tokens,
                      requests=trace.requests[:max_requests])
    return trace


# ----------------------------------------------------------------------------- cells


def _run_cell(cell: tuple) -> dict:
    """One replay: (trace spec, model, policy, budget fraction or None, budget bytes or None)."""
    spec, model_name, policy, fraction, budget, ws = cell
    trace = _load_trace(spec)
    model = SIM_MODELS[model_name]
    r = replay(trace, model, policy, budget, budget_fraction=fraction)
    by_kind: dict[str, int] = {}
    for name, g in r.groups.items():
        kind = name.split(":", 1)[1]
        by_kind[kind] = by_kind.get(kind, 0) + g.bytes_written
    return {
        "trace": trace.name,
        "model": model_name,
        "policy": policy,
        "budget_fraction": fraction,
        "budget_bytes": budget,
        "working_set_bytes": ws,
        "requests": r.requests,
        "prompt_tokens": r.prompt_tokens,
        "hit_tokens": r.hit_tokens,
        "token_hit_rate": r.token_hit_rate,
        "flops_saved_fraction": r.flops_saved / r.flops_total if r.flops_total else 0.0,
        "flops_saved": r.flops_saved,
        "flops_total": r.flops_total,
        "bytes_written": r.bytes_written,
        "bytes_read": r.bytes_read,
        "bytes_written_per_hit_token": r.bytes_written_per_hit_token,
        "peak_bytes": r.peak_bytes,
        "group_bytes_written": {name: g.bytes_written for name, g in r.groups.items()},
        "kind_bytes_written": by_kind,
        "groups": {name: {f: getattr(g, f) for f in g.__struct_fields__}
                   for name, g in r.groups.items()},
        "stores_rejected": r.stores_rejected,
        "stores_skipped": r.stores_skipped,
        "wall_s": r.wall_s,
    }


def _cost_hint(cell: tuple) -> tuple:
    """Sort key: likely-slow cells first, so the pool's tail is short."""
    _, model, policy, fraction, _, ws = cell
    return (policy != "group_aware", -(ws or 0), -(fraction or 0))


# ----------------------------------------------------------------------------- targets


def _key(c: dict) -> tuple:
    return (c["trace"], c["model"], c["policy"], c["budget_fraction"])


def _ratio(ga: dict, lru: dict) -> float | None:
    return ga["token_hit_rate"] / lru["token_hit_rate"] if lru["token_hit_rate"] > 0 else None


def evaluate_targets(results: list[dict]) -> dict:
    """The issue's figures, from the measured cells only."""
    by = {_key(c): c for c in results}
    ratio_rows = []
    for model in RATIO_TARGET["models"]:
        f = RATIO_TARGET["budget_fraction"]
        ga = by.get((RATIO_TARGET["trace"], model, "group_aware", f))
        lru = by.get((RATIO_TARGET["trace"], model, "lru", f))
        row = {"trace": RATIO_TARGET["trace"], "model": model, "budget_fraction": f}
        if ga is None or lru is None:
            row.update(measured=False, met=None)
        else:
            ratio = _ratio(ga, lru)
            row.update(measured=True, group_aware=ga["token_hit_rate"],
                       lru=lru["token_hit_rate"], ratio=ratio,
                       met=ratio is None or ratio >= RATIO_TARGET["min_ratio"])
            # no policy beats the unbounded store: the largest ratio any policy could reach
            unb = by.get((RATIO_TARGET["trace"], model, UNBOUNDED, None))
            if unb is not None:
                row["unbounded"] = unb["token_hit_rate"]
                row["max_possible_ratio"] = _ratio(unb, lru)
        ratio_rows.append(row)
    measured = [r for r in ratio_rows if r["measured"]]

    violations, checked = [], 0
    for (trace, model, policy, f), ga in sorted(by.items(), key=lambda kv: str(kv[0])):
        if policy != "group_aware":
            continue
        lru = by.get((trace, model, "lru", f))
        if lru is None:
            continue
        checked += 1
        # compare integer hit tokens (same prompts), not floats
        if ga["hit_tokens"] < lru["hit_tokens"]:
            violations.append({"trace": trace, "model": model, "budget_fraction": f,
                               "group_aware": ga["token_hit_rate"],
                               "lru": lru["token_hit_rate"],
                               "margin": ga["token_hit_rate"] - lru["token_hit_rate"]})
    return {
        "ratio_at_25pct": {
            "description": (f"group_aware / lru token hit rate on {RATIO_TARGET['trace']} at "
                            f"{RATIO_TARGET['budget_fraction']:.0%} of the working set, "
                            f"target >= {RATIO_TARGET['min_ratio']}"),
            "target": RATIO_TARGET["min_ratio"],
            "cells": ratio_rows,
            "met": all(r["met"] for r in measured) if measured else None,
        },
        "group_aware_ge_lru": {
            "description": "group_aware token hit rate >= lru at every trace x model x budget",
            "checked": checked,
            "violations": violations,
            "met": not violations if checked else None,
        },
    }


def target_lines(targets: dict) -> list[str]:
    a, b = targets["ratio_at_25pct"], targets["group_aware_ge_lru"]
    lines = [f"target (a): {a['description']}"]
    for r in a["cells"]:
        where = f"{r['trace']} x {r['model']} @ {r['budget_fraction']:.0%}"
        if not r["measured"]:
            lines.append(f"  {where}: not measured in this run")
        else:
            ratio = "inf" if r["ratio"] is None else f"{r['ratio']:.2f}"
            line = (f"  {where}: group_aware {r['group_aware']:.3f} / lru {r['lru']:.3f}"
                    f" = {ratio}x -> {'MET' if r['met'] else 'MISSED'}")
            if r.get("max_possible_ratio") is not None:
                line += (f" (unbounded store {r['unbounded']:.3f}: no policy can exceed "
                         f"{r['max_possible_ratio']:.2f}x here)")
            lines.append(line)
    lines.append(f"target (b): {b['description']}: {b['checked']} cells checked, "
                 f"{len(b['violations'])} violation(s) -> "
                 + ("not measured" if b["met"] is None else "MET" if b["met"] else "MISSED"))
    for v in b["violations"]:
        lines.append(f"  {v['trace']} x {v['model']} @ {v['budget_fraction']:.0%}: "
                     f"group_aware {v['group_aware']:.4f} < lru {v['lru']:.4f} "
                     f"(margin {v['margin']:+.4f})")
    return lines


# ----------------------------------------------------------------------------- output


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def print_tables(results: list[dict], traces: list[str], models: list[str]) -> None:
    by = {_key(c): c for c in results}
    for trace in traces:
        for model in models:
            unb = by.get((trace, model, UNBOUNDED, None))
            any_cell = next((c for c in results if c["trace"] == trace and c["model"] == model),
                            None)
            if any_cell is None:
                continue
            print(f"\n{trace} x {model}: {any_cell['requests']} requests, "
                  f"{any_cell['prompt_tokens']} prompt tokens, working set "
                  f"{_gib(any_cell['working_set_bytes'])}")
            head = f"{'budget':>9} " + "".join(f"{p:>13}" for p in POLICIES) + f"{'ga/lru':>9}"
            print(head)
            fractions = sorted({c["budget_fraction"] for c in results
                                if c["trace"] == trace and c["model"] == model
                                and c["budget_fraction"] is not None})
            for f in fractions:
                row = f"{f:>9.0%} "
                for p in POLICIES:
                    c = by.get((trace, model, p, f))
                    row += f"{c['token_hit_rate']:>13.3f}" if c else f"{'-':>13}"
                ga, lru = by.get((trace, model, "group_aware", f)), by.get((trace, model, "lru", f))
                if ga and lru:
                    ratio = _ratio(ga, lru)
                    row += f"{'inf' if ratio is None else f'{ratio:.2f}x':>9}"
                print(row)
            if unb:
                print(f"{'unbounded':>9} {unb['token_hit_rate']:>13.3f}  (upper bound; "
                      f"writes {_gib(unb['bytes_written'])})")


def machine_info() -> dict:
    info = {"host": platform.node(), "platform": platform.platform(),
            "python": platform.python_version(), "processor": platform.processor(),
            "cpus": os.cpu_count()}
    try:
        root = Path(__file__).resolve().parent.parent
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
            timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--quick", action="store_true",
                   help='"quick" scale traces (150-300 requests each), the whole grid '
                        "(156 replays); 35-50 s with --jobs 2 on 2 cores")
    p.add_argument("--traces", type=_csv, default=None,
                   help=f"comma-separated generators (default: all: {','.join(GENERATORS)})")
    p.add_argument("--models", type=_csv, default=None,
                   help=f"comma-separated layouts (default: all: {','.join(SIM_MODELS)})")
    p.add_argument("--trace-file", default=None,
                   help="replay this JSONL trace (Mooncake format or tokens) instead of the "
                        "generators")
    p.add_argument("--block-tokens", type=int, default=64,
                   help="tokens per hash id in --trace-file (must divide the 256-token chunk; "
                        "default 64)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (default 2; 1: no pool)")
    p.add_argument("--max-requests", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.trace_file and a.traces:
        p.error("--traces and --trace-file are exclusive")
    traces = [] if a.trace_file else (a.traces or list(GENERATORS))
    for t in traces:
        if t not in GENERATORS:
            p.error(f"unknown trace {t!r}; valid: {', '.join(GENERATORS)}")
    models = a.models or list(SIM_MODELS)
    for m in models:
        if m not in SIM_MODELS:
            p.error(f"unknown model {m!r}; valid: {', '.join(SIM_MODELS)}")
    if a.trace_file:
        for m in models:
            for g in SIM_MODELS[m].layout.groups:
                if a.block_tokens < 1 or g.chunk_tokens % a.block_tokens:
                    p.error(f"--block-tokens {a.block_tokens} does not divide {m}'s "
                            f"{g.chunk_tokens}-token chunks")
    if a.jobs < 1:
        p.error("--jobs must be >= 1")
    if a.max_requests is not None and a.max_requests < 1:
        p.error("--max-requests must be >= 1")

    started = time.perf_counter()
    specs = [_trace_spec(a, None)] if a.trace_file else [_trace_spec(a, t) for t in traces]
    cells, trace_names = [], []
    for spec in specs:
        trace = _load_trace(spec)
        trace_names.append(trace.name)
        for m in models:
            ws = working_set_bytes(trace, SIM_MODELS[m])
            cells.append((spec, m, UNBOUNDED, None, None, ws))
            for pol in POLICIES:
                for f in BUDGET_FRACTIONS:
                    cells.append((spec, m, pol, f, int(ws * f), ws))
    cells.sort(key=_cost_hint)
    print(f"hit_rate: {len(cells)} replays ({len(specs)} trace(s) x {len(models)} model(s) x "
          f"({len(POLICIES)} policies x {len(BUDGET_FRACTIONS)} budgets + unbounded)), "
          f"{'quick' if a.quick else 'full'} scale, {a.jobs} job(s)", flush=True)

    if a.jobs == 1:
        results = [_run_cell(c) for c in cells]
    else:
        with multiprocessing.get_context().Pool(a.jobs) as pool:
            results = list(pool.imap_unordered(_run_cell, cells, chunksize=1))
    order = {(n, m): i for i, (n, m) in enumerate((n, m) for n in trace_names for m in models)}
    results.sort(key=lambda c: (order[(c["trace"], c["model"])],
                                POLICIES.index(c["policy"]) if c["policy"] in POLICIES else -1,
                                c["budget_fraction"] or 0.0))
    wall = time.perf_counter() - started

    print_tables(results, trace_names, models)
    targets = evaluate_targets(results)
    doc = {
        "benchmark": "hit_rate",
        "quick": a.quick,
        "command": [sys.executable, *(sys.argv if argv is None else [__file__, *argv])],
        "machine": machine_info(),
        "grid": {
            "traces": trace_names,
            "trace_file": a.trace_file,
            "block_tokens": a.block_tokens if a.trace_file else None,
            "scale": None if a.trace_file else ("quick" if a.quick else "full"),
            "max_requests": a.max_requests,
            "models": models,
            "policies": list(POLICIES),
            "budget_fractions": list(BUDGET_FRACTIONS),
            "unbounded": True,
            "cells": len(results),
            "coverage": "full grid: every trace x model x policy x budget, plus unbounded",
        },
        "jobs": a.jobs,
        "wall_s": wall,
        "results": results,
        "targets": targets,
    }
    Path(a.out).write_text(json.dumps(doc, indent=1))
    print()
    for line in target_lines(targets):
        print(line)
    print(f"\n{len(results)} replays in {wall:.1f} s; saved {a.out}")
    return doc


if __name__ == "__main__":
    main()
