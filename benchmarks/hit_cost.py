"""Where a disk hit's time goes, per stage, and whether a hit is ever slower than recomputing.

Three engines stay alive side by side (``engine_runs.Engine``, same model and core binding):
``off`` (no hybridkv), ``on`` (hybridkv, every servable hit reported) and ``rule``
(hybridkv with ``hit_cost_rule``: a hit is reported only where it is expected to pay). Per
prompt length, one prompt is stored on ``on`` and ``rule``; then in paired rounds (the order
flips every round) each engine serves it after ``reset_prefix_cache()``: ``off`` recomputes,
``on`` loads from disk, ``rule`` loads or recomputes as its rule says. Figures per length:
median TTFT of each, the paired ratio recompute / hit (>= 1: the hit did not cost more), and
the stages of the ``on`` hit (the counters ``hybridkv.vllm`` keeps, microseconds):

- ``lookup``: ``get_num_new_matched_tokens`` of the hit (lookups, the hit rule);
- ``queue``: chunk tasks waiting for an I/O thread; ``read``: reading and verifying chunk
  files; ``copy``: copying pages into the KV cache (summed over chunks: tasks overlap);
- ``job``: a load job, submitted to seen done by vLLM's worker poll;
- ``ready``: the load scheduled to vLLM told it finished (every scheduler step it waited);
- the TTFT difference hit - recompute, the whole fixed cost against the prefill it saved.

Target: with the rule, at every length the median paired ratio off / rule >= 1.0. The
crossover (shortest length from which every longer one has ratio >= 1) is reported with and
without the rule. The rule's engine is taught first (two hits per length, not measured).

    python benchmarks/hit_cost.py --out F.json [--quick] [--model KIND] [--lengths L,L,..]
        [--pairs N]

A length is the prompt's; the hit is the whole chunks before its last token (200 -> 128
tokens with 128-token blocks). ``--quick``: the tiny gemma3 model, lengths 200,1024,1920, 3
pairs. Default: gemma3_bench, lengths 200,1024,2048,8192, 5 pairs.
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

WARM_UP = 300  # tokens of each engine's first, untimed request
STAGES = ("lookup_hit_us", "load_queue_us", "load_read_us", "load_copy_us", "load_job_us",
          "load_ready_us")


def _fail(msg: str) -> int:
    print(f"hit_cost.py: {msg}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default=None)
    ap.add_argument("--lengths", default=None, help="prompt lengths, comma-separated")
    ap.add_argument("--pairs", type=int, default=None, help="paired rounds per length")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from hybridkv.demo.models import (
        ALL_KINDS,
        BENCH_KINDS,
        BENCH_MAX_POSITIONS,
        MAX_POSITIONS,
        VLLM_ENGINE_KWARGS,
    )

    kind = args.model or ("gemma3" if args.quick else "gemma3_bench")
    if kind not in ALL_KINDS:
        return _fail(f"unknown --model {kind!r} (expected one of {', '.join(ALL_KINDS)})")
    limit = (BENCH_MAX_POSITIONS if kind in BENCH_KINDS else MAX_POSITIONS // 2) - 128
    try:
        lengths = sorted(int(x) for x in (args.lengths or (
            "200,1024,1920" if args.quick else "200,1024,2048,8192")).split(","))
    except ValueError:
        return _fail(f"--lengths {args.lengths!r}: expected comma-separated integers")
    shortest = VLLM_ENGINE_KWARGS[kind]["block_size"] + 1  # a hit needs one whole chunk
    if lengths[0] < shortest or lengths[-1] > limit:
        return _fail(f"--lengths {args.lengths}: each must be in {shortest}..{limit} for {kind} "
                     f"(a hit is the whole chunks before the last token)")
    pairs = args.pairs if args.pairs is not None else (3 if args.quick else 5)
    if pairs < 1:
        return _fail(f"--pairs must be >= 1 (got {pairs})")
    out = Path(args.out)
    if not out.parent.is_dir():
        return _fail(f"--out {args.out}: directory {out.parent} does not exist")

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="hybridkv-hitcost-",
                                 dir=os.environ.get("HYBRIDKV_BENCH_DIR")))
    try:
        rows = run(kind, lengths, pairs, args.seed, work)
    except (RuntimeError, OSError) as exc:
        print(f"hit_cost.py: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"{'length':>6s} {'recompute':>10s} {'hit':>8s} {'rule':>8s} {'off/on':>7s} "
          f"{'off/rule':>8s} {'rule hit?':>9s}  stages of a hit (ms): lookup queue read copy "
          f"job ready")
    for r in rows:
        st = r["stages_ms"]
        print(f"{r['length']:6d} {r['ttft_off_ms']:10.1f} {r['ttft_on_ms']:8.1f} "
              f"{r['ttft_rule_ms']:8.1f} {r['ratio_off_on']:7.3f} {r['ratio_off_rule']:8.3f} "
              f"{r['rule_hit_fraction']:9.2f}  " + " ".join(
                  f"{st[s]:.1f}" for s in STAGES))
    cross = {"without_rule": crossover(rows, "ratio_off_on"),
             "with_rule": crossover(rows, "ratio_off_rule")}
    print(f"crossover length (hits pay from here on): without the rule {cross['without_rule']}, "
          f"with it {cross['with_rule']} (None: not even at the longest length)")
    worst = min(r["ratio_off_rule"] for r in rows)
    worst_len = min(rows, key=lambda r: r["ratio_off_rule"])["length"]
    targets = {"hit_not_slower_than_recompute_with_rule": {
        "figure": round(worst, 3), "goal": ">= 1.0", "met": worst >= 1.0,
        "worst_cell": f"length {worst_len}",
        "without_rule_figure": round(min(r["ratio_off_on"] for r in rows), 3)}}
    print_targets(targets)
    save(out, "hit_cost", quick=args.quick, started=started, targets=targets, rows=rows,
         crossover=cross, settings={"model": kind, "lengths": lengths, "pairs": pairs,
                                    "binding": "VLLM_CPU_NUM_OF_RESERVED_CPU=1 for every engine"})
    return 0


def crossover(rows: list[dict], key: str) -> int | None:
    """The shortest length from which every longer one has ratio >= 1 (None: none)."""
    best = None
    for r in reversed(rows):
        if r[key] < 1.0:
            break
        best = r["length"]
    return best


def run(kind: str, lengths: list[int], pairs: int, seed: int, work: Path) -> list[dict]:
    from hybridkv.demo.models import build_tiny_model, default_model_dir

    model = str(build_tiny_model(kind, default_model_dir(kind)))
    rng = random.Random(seed)
    base = {"model": model, "max_model_len": max(lengths[-1], WARM_UP) + 64}
    names = ("off", "on", "rule")
    settings = {"on": {}, "rule": {"hit_cost_rule": True}}
    engines: dict[str, Engine] = {}
    print(f"starting engines off, on, rule ({kind}) ...", flush=True)
    try:
        for name in names:
            spec = dict(base)
            if name != "off":
                (work / name).mkdir()
                spec.update(cache_dir=str(work / name), settings=settings[name])
            engines[name] = Engine(spec, work / f"{name}.log")

        def gen(name, prompt, *, reset=True, disk=False):
            (step,) = engines[name].run([{"op": "generate", "prompts": [prompt], "reset": reset,
                                          "disk": disk}])
            return step["requests"][0]

        prompts = {n: [rng.randrange(4, 260) for _ in range(n)] for n in lengths}
        for name in names:  # warm-up on other tokens, not timed
            gen(name, [rng.randrange(4, 260) for _ in range(WARM_UP)])
        for n, prompt in prompts.items():  # store, then teach the rule (two hits each)
            for name in ("on", "rule"):
                gen(name, prompt)
            time.sleep(0.5)
            gen("rule", prompt)
            gen("rule", prompt)
        rows = []
        for n, prompt in prompts.items():
            got: dict[str, list[dict]] = {name: [] for name in names}
            for p in range(pairs):
                for name in (names if p % 2 == 0 else names[::-1]):
                    got[name].append(gen(name, prompt, disk=name != "off"))
            rows.append(_row(n, got))
            print(f"length {n}: done", flush=True)
    finally:
        for engine in engines.values():
            try:
                engine.close()
            except Exception:  # noqa: BLE001  a dead engine: kill it, report the rest
                if engine.proc.poll() is None:
                    engine.proc.kill()
    return rows


def _row(n: int, got: dict[str, list[dict]]) -> dict:
    ttft = {name: [r["ttft_s"] for r in rs] for name, rs in got.items()}
    hits = [r for r in got["on"] if r["disk"]["tokens_from_disk"] > 0]
    if not hits:  # e.g. a prompt shorter than a chunk plus one token
        raise RuntimeError(f"length {n}: engine 'on' loaded nothing from disk (a hit is the "
                           f"whole chunks before the prompt's last token)")
    stages = {s: statistics.median(r["disk"].get(s, 0) for r in hits) / 1e3 for s in STAGES}
    return {
        "length": n,
        "ttft_off_ms": statistics.median(ttft["off"]) * 1e3,
        "ttft_on_ms": statistics.median(ttft["on"]) * 1e3,
        "ttft_rule_ms": statistics.median(ttft["rule"]) * 1e3,
        "ratio_off_on": statistics.median(a / b for a, b in zip(ttft["off"], ttft["on"])),
        "ratio_off_rule": statistics.median(a / b for a, b in zip(ttft["off"], ttft["rule"])),
        "rule_hit_fraction": sum(r["disk"]["tokens_from_disk"] > 0 for r in got["rule"])
        / len(got["rule"]),
        "tokens_from_disk_on": statistics.median(r["disk"]["tokens_from_disk"] for r in hits),
        "stages_ms": stages,
        "runs": got,
    }


if __name__ == "__main__":
    sys.exit(main())
