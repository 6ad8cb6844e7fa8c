"""Token hit rate of the capacity policies on simulated workloads, per hybrid model layout.

For each trace and each model layout the working set (every distinct chunk of
every group, i.e. what an unbounded store would hold) is measured, then every
policy (group_aware, lru, watermark) and the offline ``reference`` policy
(``hybridkv.sim.reference``: knows every later request, Belady-style) replay
the trace under a budget of 10%, 25%, 50% and 100% of that working set, and the
pseudo-policy "unbounded" (no budget, store everything) gives the upper bound
once per trace x model. Replays are the simulator's (``hybridkv.sim.replay``):
nothing is written to disk, so these are hit rates and byte counts, not timings.

Targets (printed as ``target NAME: FIGURE (goal GOAL) MET|MISSED`` and saved
under "targets"), from the cells measured in this same run:
(a) group_aware >= 0.9 x reference at 25% of the working set and >= 0.8 x at
    10%, in every trace x model (one line per budget: the worst cell);
(b) group_aware >= lru in every trace x model x budget (the worst cell);
beside them (not targets, under "ratios_vs_lru"): group_aware / lru at 10% and
25% and the largest ratio any policy could reach there (unbounded / lru,
reference / lru); and a check that the reference is at least the best other
policy in every cell (under "reference_strength"). At ``--scale large`` also
``target large_grid_minutes`` (the whole large grid with --jobs 2, goal <= 30;
extrapolated from the measured replays when only part of it ran). Missed targets
are reported, not hidden; the exit code is 0.

    python benchmarks/hit_rate.py --out hit_rate.json [--scale quick|full|large]
        [--quick] [--traces a,b] [--models x,y] [--trace-file F.jsonl
        --block-tokens N] [--jobs N]

--quick (= --scale quick) uses the "quick" scale of the synthetic traces
(150-300 requests each) and still runs the whole grid: 4 traces x 3 models x
(4 policies x 4 budgets + unbounded) = 204 replays, about a minute with --jobs 2
on 2 cores. The default "full" scale has about 4x the requests (several minutes).
"large" is about 12K requests per trace (multi_turn: ~143M prompt tokens); by
default it runs multi_turn only (3 x 17 replays); name others with --traces.
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
from hybridkv.sim.traces import GENERATORS, SCALES, Trace, load_jsonl, make_trace

#: online policies, then the offline reference
ONLINE = ("group_aware", "lru", "watermark")
REFERENCE = "reference"
POLICIES = (*ONLINE, REFERENCE)
UNBOUNDED = "unbounded"
BUDGET_FRACTIONS = (0.10, 0.25, 0.50, 1.00)
#: target (a): group_aware / reference at least this, per budget fraction, in every cell
REFERENCE_TARGETS = {0.25: 0.9, 0.10: 0.8}
#: target large_grid_minutes: the whole grid on the large multi_turn trace with --jobs 2
LARGE_GRID_GOAL_MIN = 30.0

# ----------------------------------------------------------------------------- traces


def _trace_spec(args: argparse.Namespace, name: str | None) -> tuple:
    """A picklable description of a trace, rebuilt (and cached) in each worker."""
    if args.trace_file:
        return ("file", str(Path(args.trace_file).resolve()), args.block_tokens,
                args.max_requests)
    return ("gen", name, args.scale, args.max_requests)


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
    return (policy not in ("group_aware", REFERENCE), -(ws or 0), -(fraction or 0))


# ----------------------------------------------------------------------------- targets


def _key(c: dict) -> tuple:
    return (c["trace"], c["model"], c["policy"], c["budget_fraction"])


def _ratio(num: dict, den: dict) -> float | None:
    """Hit-rate ratio; None when the denominator has no hits (inf if the numerator has)."""
    return num["token_hit_rate"] / den["token_hit_rate"] if den["token_hit_rate"] > 0 else None


def _fmt_ratio(r: float | None, num: dict | None = None) -> str:
    if r is None:
        return "inf" if num is not None and num["token_hit_rate"] > 0 else "-"
    return f"{r:.3f}"


def _where(c: dict) -> str:
    return f"{c['trace']} x {c['model']}"


def evaluate_targets(results: list[dict]) -> dict:
    """Targets (a) and (b), from the measured cells only."""
    by = {_key(c): c for c in results}
    pairs = sorted({(c["trace"], c["model"]) for c in results})
    out: dict = {}
    for f, goal in REFERENCE_TARGETS.items():
        cells = []
        for trace, model in pairs:
            ga, ref = by.get((trace, model, "group_aware", f)), by.get((trace, model, REFERENCE, f))
            if ga is None or ref is None:
                continue
            ratio = _ratio(ga, ref)
            # compare integer hit tokens (same prompts): no hits at all is a ratio of 1
            figure = 1.0 if ga["hit_tokens"] >= ref["hit_tokens"] and ratio is None else ratio
            cells.append({"trace": trace, "model": model, "budget_fraction": f,
                          "group_aware": ga["token_hit_rate"], "reference": ref["token_hit_rate"],
                          "ratio": figure, "met": figure is not None and figure >= goal})
        worst = min(cells, key=lambda c: -1.0 if c["ratio"] is None else c["ratio"],
                    default=None)
        out[f"group_aware_vs_reference_{round(f * 100)}pct"] = {
            "description": f"group_aware / reference token hit rate at {f:.0%} of the working "
                           f"set, in every trace x model (figure: the worst cell)",
            "goal": goal,
            "figure": None if worst is None else worst["ratio"],
            "worst": None if worst is None else {"trace": worst["trace"], "model": worst["model"]},
            "cells": cells,
            "met": None if not cells else all(c["met"] for c in cells),
        }

    violations, margins = [], []
    for (trace, model, policy, f), ga in sorted(by.items(), key=lambda kv: str(kv[0])):
        if policy != "group_aware":
            continue
        lru = by.get((trace, model, "lru", f))
        if lru is None:
            continue
        margin = ga["token_hit_rate"] - lru["token_hit_rate"]
        row = {"trace": trace, "model": model, "budget_fraction": f,
               "group_aware": ga["token_hit_rate"], "lru": lru["token_hit_rate"], "margin": margin}
        margins.append(row)
        if ga["hit_tokens"] < lru["hit_tokens"]:  # integer hit tokens, not floats
            violations.append(row)
    worst = min(margins, key=lambda r: r["margin"], default=None)
    out["group_aware_ge_lru"] = {
        "description": "group_aware token hit rate >= lru at every trace x model x budget "
                       "(figure: the smallest margin group_aware - lru)",
        "goal": 0.0,
        "figure": None if worst is None else worst["margin"],
        "worst": worst,
        "checked": len(margins),
        "violations": violations,
        "met": not violations if margins else None,
    }
    return out


def ratios_vs_lru(results: list[dict]) -> list[dict]:
    """Beside the targets: group_aware / lru at 10% and 25%, and what any policy could reach."""
    by = {_key(c): c for c in results}
    rows = []
    for trace, model in sorted({(c["trace"], c["model"]) for c in results}):
        unb = by.get((trace, model, UNBOUNDED, None))
        for f in (0.10, 0.25):
            ga, lru, ref = (by.get((trace, model, p, f)) for p in ("group_aware", "lru", REFERENCE))
            if ga is None or lru is None:
                continue
            rows.append({"trace": trace, "model": model, "budget_fraction": f,
                         "group_aware_over_lru": _ratio(ga, lru),
                         "reference_over_lru": None if ref is None else _ratio(ref, lru),
                         "unbounded_over_lru": None if unb is None else _ratio(unb, lru)})
    return rows


def reference_strength(results: list[dict]) -> dict:
    """The reference is at least the best online policy in every cell (else it is no bound)."""
    by = {_key(c): c for c in results}
    checked, violations = 0, []
    for (trace, model, policy, f), ref in sorted(by.items(), key=lambda kv: str(kv[0])):
        if policy != REFERENCE:
            continue
        others = [by[k] for p in ONLINE if (k := (trace, model, p, f)) in by]
        if not others:
            continue
        checked += 1
        best = max(others, key=lambda c: c["hit_tokens"])
        if ref["hit_tokens"] < best["hit_tokens"]:
            violations.append({"trace": trace, "model": model, "budget_fraction": f,
                               "reference": ref["token_hit_rate"], "best": best["policy"],
                               "best_rate": best["token_hit_rate"],
                               "margin": ref["token_hit_rate"] - best["token_hit_rate"]})
    return {"description": "reference token hit rate >= the best of group_aware, lru, "
                           "watermark in every cell",
            "checked": checked, "violations": violations,
            "ok": not violations if checked else None}


def large_grid_minutes(results: list[dict], wall_s: float, jobs: int, full_grid: bool) -> dict:
    """Minutes the whole large multi_turn grid takes with 2 jobs: measured or extrapolated."""
    cells = [c for c in results if c["trace"] == "multi_turn"]
    models = {c["model"] for c in cells}
    if full_grid and jobs == 2 and len(models) == len(SIM_MODELS):
        minutes, how = wall_s / 60, "measured"
    else:
        # replays measured here, scaled to every model, spread over 2 workers
        per_model = sum(c["wall_s"] for c in cells) / max(1, len(models))
        minutes, how = per_model * len(SIM_MODELS) / 2 / 60, "extrapolated"
    return {"description": "minutes for the whole --scale large grid on multi_turn "
                           "(3 models x (4 policies x 4 budgets + unbounded)) with --jobs 2",
            "goal": LARGE_GRID_GOAL_MIN, "figure": minutes, "how": how,
            "met": minutes <= LARGE_GRID_GOAL_MIN}


def _status(met: bool | None) -> str:
    return "not measured" if met is None else "MET" if met else "MISSED"


def target_lines(targets: dict) -> list[str]:
    lines = []
    for name, t in targets.items():
        if name == "large_grid_minutes":
            fig = f"{t['figure']:.1f}"
            lines.append(f"target {name}: {fig} (goal <= {t['goal']:.0f} with --jobs 2) "
                         f"{_status(t['met'])} [{t['how']}]")
            continue
        if name == "group_aware_ge_lru":
            fig = "-" if t["figure"] is None else f"{t['figure']:+.4f}"
            w = t["worst"]
            where = "" if w is None else (f" [worst: {_where(w)} @ {w['budget_fraction']:.0%}; "
                                          f"{t['checked']} cells, {len(t['violations'])} below]")
            lines.append(f"target {name}: {fig} (goal >= 0) {_status(t['met'])}{where}")
            for v in t["violations"]:
                lines.append(f"  {_where(v)} @ {v['budget_fraction']:.0%}: group_aware "
                             f"{v['group_aware']:.4f} < lru {v['lru']:.4f} ({v['margin']:+.4f})")
            continue
        fig = "-" if t["figure"] is None else f"{t['figure']:.3f}"
        where = "" if t["worst"] is None else (f" [worst: {_where(t['worst'])}; "
                                               f"{len(t['cells'])} cells]")
        lines.append(f"target {name}: {fig} (goal >= {t['goal']}) {_status(t['met'])}{where}")
    return lines


def beside_lines(rows: list[dict], strength: dict) -> list[str]:
    lines = ["beside (not targets): group_aware / lru, and the most any policy could reach "
             "(unbounded / lru, reference / lru)"]
    for r in rows:
        lines.append(f"  {_where(r)} @ {r['budget_fraction']:.0%}: group_aware/lru "
                     f"{_fmt_ratio(r['group_aware_over_lru'])}, unbounded/lru "
                     f"{_fmt_ratio(r['unbounded_over_lru'])}, reference/lru "
                     f"{_fmt_ratio(r['reference_over_lru'])}")
    lines.append(f"check reference_strength: {strength['checked']} cells, "
                 f"{len(strength['violations'])} where reference < the best other policy -> "
                 + ("not measured" if strength["ok"] is None else "OK" if strength["ok"]
                    else "VIOLATED"))
    for v in strength["violations"]:
        lines.append(f"  {_where(v)} @ {v['budget_fraction']:.0%}: reference "
                     f"{v['reference']:.4f} < {v['best']} {v['best_rate']:.4f} "
                     f"({v['margin']:+.4f})")
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
            head = (f"{'budget':>9} " + "".join(f"{p:>13}" for p in POLICIES)
                    + f"{'ga/lru':>9}{'ga/ref':>9}")
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
                ref = by.get((trace, model, REFERENCE, f))
                for num, den in ((ga, lru), (ga, ref)):
                    if num and den:
                        ratio = _ratio(num, den)
                        row += f"{_fmt_ratio(ratio, num) + ('x' if ratio else ''):>9}"
                    else:
                        row += f"{'-':>9}"
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
    p.add_argument("--scale", choices=SCALES, default="full",
                   help='synthetic trace scale: "quick" (150-300 requests each), "full" '
                        '(default, ~4x), "large" (~12K requests; multi_turn only by default)')
    p.add_argument("--quick", action="store_true",
                   help='= --scale quick: the whole grid (204 replays), about a minute with '
                        "--jobs 2 on 2 cores")
    p.add_argument("--traces", type=_csv, default=None,
                   help=f"comma-separated generators (default: all: {','.join(GENERATORS)}; "
                        "at --scale large: multi_turn)")
    p.add_argument("--models", type=_csv, default=None,
                   help=f"comma-separated layouts (default: all: {','.join(SIM_MODELS)})")
    p.add_argument("--trace-file", default=None,
                   help="replay this JSONL trace (Mooncake format or tokens) instead of the "
                        "generators")
    p.add_argument("--block-tokens", type=int, default=64,
                   help="tokens per hash id in --trace-file (must divide the 256-token chunk "
                        "or be a multiple of it, e.g. Mooncake's 512; default 64)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (default 2; 1: no pool)")
    p.add_argument("--max-requests", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.trace_file and a.traces:
        p.error("--traces and --trace-file are exclusive")
    if a.quick:
        if "--scale" in (sys.argv if argv is None else argv) and a.scale != "quick":
            p.error("--quick is --scale quick")
        a.scale = "quick"
    default = ["multi_turn"] if a.scale == "large" else list(GENERATORS)
    traces = [] if a.trace_file else (a.traces or default)
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
                if a.block_tokens < 1 or (g.chunk_tokens % a.block_tokens
                                          and a.block_tokens % g.chunk_tokens):
                    p.error(f"--block-tokens {a.block_tokens} neither divides {m}'s "
                            f"{g.chunk_tokens}-token chunks nor is a multiple of them")
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
          f"{'file' if a.trace_file else a.scale} scale, {a.jobs} job(s)", flush=True)

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
    if a.scale == "large" and not a.trace_file and "multi_turn" in traces:
        full_grid = a.max_requests is None and set(models) == set(SIM_MODELS)
        targets["large_grid_minutes"] = large_grid_minutes(results, wall, a.jobs, full_grid)
    vs_lru = ratios_vs_lru(results)
    strength = reference_strength(results)
    doc = {
        "benchmark": "hit_rate",
        "quick": a.scale == "quick" and not a.trace_file,
        "command": [sys.executable, *(sys.argv if argv is None else [__file__, *argv])],
        "machine": machine_info(),
        "grid": {
            "traces": trace_names,
            "trace_file": a.trace_file,
            "block_tokens": a.block_tokens if a.trace_file else None,
            "scale": None if a.trace_file else a.scale,
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
        "ratios_vs_lru": vs_lru,
        "reference_strength": strength,
    }
    Path(a.out).write_text(json.dumps(doc, indent=1))
    print()
    for line in target_lines(targets) + beside_lines(vs_lru, strength):
        print(line)
    print(f"\n{len(results)} replays in {wall:.1f} s; saved {a.out}")
    return doc


if __name__ == "__main__":
    main()
