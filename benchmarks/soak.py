"""Soak with faults: two ``hybridkv serve`` replicas on one directory under multi-turn load.

The replicas share one cache directory with a small ``disk_budget`` (so the fleet is on);
requests go round robin to the replicas that are up. Meanwhile the harness injects, in
turn: SIGKILL of one replica's whole process group (then a restart on the same port), a
flipped bit in a chunk file, a deleted chunk file. Every completed response is compared with
a server without offload (greedy); the no-offload noise floor (the same concurrent workload
twice on that server) is measured first and reported. Checked and reported:

- ``wrong_outputs``: completed responses whose tokens differ from the reference (target 0);
- ``failed_not_killed``: failed requests other than those in flight on a replica when it
  was killed (or sent in the instant it went down) (target 0);
- ``disk_over_budget``: the most bytes of chunk files seen on disk above the budget (target:
  0; sampled between faults);
- disk hits after each fault (``tokens_from_disk`` grows in the next wave);
- counts: requests, faults injected by kind, failures by reason.
The directory is a small tmpfs where the harness may mount one (root), and the "fill" fault
fills it (ENOSPC for a wave, then freed); elsewhere "fill" is skipped and the reason saved.

    python benchmarks/soak.py --out F.json [--quick] [--waves N] [--budget SIZE]

``--quick``: tiny gemma3, 6 waves (a clean one, each fault once, a clean one; minutes, in the
test suite); ``--waves`` for longer (default 18).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py, run or imported
from report import print_targets, save  # noqa: E402
from serving_load import Shape, multi_turn, round_robin, run_load  # noqa: E402
from serving_servers import Fleet, disk_tokens  # noqa: E402

FAULTS = ("kill", "bitflip", "delete", "fill")


def _fail(msg: str) -> int:
    print(f"soak.py: {msg}", file=sys.stderr)
    return 2


def chunk_files(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*.safetensors") if "quarantine" not in p.parts]


def disk_bytes(cache: Path) -> int:
    total = 0
    for p in chunk_files(cache):
        try:
            total += p.stat().st_size
        except OSError:
            pass  # evicted meanwhile
    return total


def mount_tmpfs(path: Path, size: int) -> str | None:
    """Mount a tmpfs of ``size`` bytes at ``path`` (so "fill" can fill it); None, or why not."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    return None if proc.returncode == 0 else (proc.stderr.strip() or "mount failed")[:200]


def fill_disk(path: Path) -> int:
    """Write a filler file until the filesystem is full (ENOSPC); bytes written."""
    written = 0
    with contextlib.suppress(OSError), open(path / "filler.bin", "wb") as f:
        block = b"\0" * 2**20
        while True:
            f.write(block)
            f.flush()
            written += len(block)
    return written


def flip_bit(cache: Path, rng: random.Random) -> str | None:
    files = chunk_files(cache)
    if not files:
        return None
    path = rng.choice(files)
    try:
        with open(path, "r+b") as f:
            size = f.seek(0, 2)
            at = rng.randrange(size // 2, size)  # in the payload
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ (1 << rng.randrange(8))]))
    except OSError:
        return None
    return path.name


def delete_file(cache: Path, rng: random.Random) -> str | None:
    files = chunk_files(cache)
    if not files:
        return None
    path = rng.choice(files)
    try:
        path.unlink()
    except OSError:
        return None
    return path.name


class Replicas:
    """The two replicas: which are up, when each was killed, restart on the same port."""

    def __init__(self, fleet: Fleet, cache: Path, budget: str):
        self.fleet, self.cache, self.budget = fleet, cache, budget
        self.procs: dict[str, object] = {}
        self.urls: dict[str, str] = {}
        self.up: set[str] = set()
        self.kills: dict[str, list[tuple[float, float]]] = {"a": [], "b": []}  # (down, up)
        self._rr = 0

    def start(self, name: str, port: int | None = None) -> None:
        extra = ["--disk-budget", self.budget]
        proc, url = self.fleet.start_engine(name, offload=True, extra=extra,
                                            cache_dir=self.cache, port=port)
        self.fleet.wait_up({name: (proc, url)})
        self.procs[name], self.urls[name] = proc, url
        self.up.add(name)

    def pick(self, req):
        names = sorted(self.up) or sorted(self.urls)
        self._rr += 1
        name = names[self._rr % len(names)]
        return name, self.urls[name]

    def kill_and_restart(self, name: str) -> None:
        down = time.monotonic()
        self.up.discard(name)
        self.fleet.kill(self.procs[name])
        port = int(self.urls[name].rsplit(":", 1)[1])
        self.start(name, port)
        self.kills[name].append((down, time.monotonic()))

    def was_killed(self, name: str, sent: float, done: float) -> bool:
        """Was ``name`` down at some time between ``sent`` and ``done`` (monotonic)?"""
        return any(d <= done + 1.0 and sent <= u for d, u in self.kills.get(name, ()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--waves", type=int, default=None, help="workload waves (faults between)")
    p.add_argument("--budget", default="8MiB", help="the replicas' shared disk_budget")
    p.add_argument("--rate", type=float, default=4.0, help="requests per second")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from hybridkv.config import ConfigError, parse_size

    waves = args.waves if args.waves is not None else (6 if args.quick else 18)
    if waves < 1:
        return _fail(f"--waves must be >= 1 (got {waves})")
    try:
        budget = parse_size(args.budget, "--budget")
    except ConfigError as exc:
        return _fail(str(exc))
    if not args.rate > 0:
        return _fail(f"--rate {args.rate}: must be positive")
    if not Path(args.out).expanduser().parent.is_dir():
        return _fail(f"--out {args.out}: directory {Path(args.out).parent} does not exist")

    started = time.perf_counter()
    rng = random.Random(f"soak {args.seed}")
    shape = Shape(users=4, system=512, question=48, answer=8, rounds=3)
    work = Path(tempfile.mkdtemp(prefix="hybridkv-soak-", dir=os.environ.get("HYBRIDKV_BENCH_DIR")))
    cache = work / "shared-cache"
    no_tmpfs = mount_tmpfs(cache, 2 * budget + 8 * 2**20)
    faults = FAULTS if no_tmpfs is None else FAULTS[:-1]
    counts = {"requests": 0, "completed": 0, "wrong_outputs": 0, "failed_killed": 0,
              "failed_not_killed": 0, "faults": {f: 0 for f in faults}, "failure_reasons": {}}
    hits_after_fault: list[dict] = []
    max_over = 0
    try:
        with Fleet(work, "gemma3", blocks=40, max_model_len=1280) as fleet:
            ref_proc, ref_url = fleet.start_engine("ref", offload=False)
            fleet.wait_up({"ref": (ref_proc, ref_url)})
            reps = Replicas(fleet, cache, args.budget)
            for name in ("a", "b"):
                reps.start(name)
            ref = round_robin({"ref": ref_url})
            # the reference and its noise floor: every wave's prompts, twice, concurrently
            expected: dict[int, dict[tuple, list[int]]] = {}
            noise = 0
            for w in range(waves):
                reqs = multi_turn(shape, args.seed)  # every wave the same: disk hits
                first, _ = run_load(reqs, args.rate, ref, fleet.model, seed=w)
                second, _ = run_load(reqs, args.rate, ref, fleet.model, seed=w + 1000)
                noise += sum(a.tokens != b.tokens for a, b in zip(first, second))
                expected[w] = {tuple(r.prompt): res.tokens for r, res in zip(reqs, first)}
            print(f"reference: {waves} waves, noise floor {noise} differing responses", flush=True)
            for w in range(waves):
                fault = faults[(w - 1) % len(faults)] if 0 < w <= waves - 2 or (
                    waves <= 2 and w) else None
                injector = None
                if fault == "kill":
                    victim = "ab"[(w // len(faults)) % 2]
                    injector = threading.Timer(1.0, reps.kill_and_restart, args=(victim,))
                    injector.start()
                elif fault == "bitflip":
                    flip_bit(cache, rng)
                elif fault == "delete":
                    delete_file(cache, rng)
                elif fault == "fill":
                    fill_disk(cache)
                if fault:
                    counts["faults"][fault] += 1
                before = disk_tokens(cache)
                reqs = multi_turn(shape, args.seed)
                results, _ = run_load(reqs, args.rate, reps.pick, fleet.model, seed=w)
                if injector is not None:
                    injector.join()
                (cache / "filler.bin").unlink(missing_ok=True)
                for req, res in zip(reqs, results):
                    counts["requests"] += 1
                    if res.ok:
                        counts["completed"] += 1
                        counts["wrong_outputs"] += res.tokens != expected[w][tuple(req.prompt)]
                    elif reps.was_killed(res.replica, res.sent_at,
                                         time.monotonic() if res.e2e is None
                                         else res.sent_at + res.e2e):
                        counts["failed_killed"] += 1
                    else:
                        counts["failed_not_killed"] += 1
                        reason = res.error[:80]
                        counts["failure_reasons"][reason] = counts["failure_reasons"].get(
                            reason, 0) + 1
                time.sleep(0.5)
                gained = disk_tokens(cache) - before
                hits_after_fault.append({"wave": w, "fault": fault, "tokens_from_disk": gained})
                max_over = max(max_over, disk_bytes(cache) - budget)
                print(f"wave {w}: fault {fault}, tokens from disk {gained}, disk "
                      f"{disk_bytes(cache) / 2**20:.1f} MiB, wrong {counts['wrong_outputs']}, "
                      f"failed {counts['failed_killed']} (killed) + "
                      f"{counts['failed_not_killed']}", flush=True)
    except RuntimeError as exc:
        print(f"soak.py: {exc} (logs in {work})", file=sys.stderr)
        return 1
    finally:
        if no_tmpfs is None:
            subprocess.run(["umount", "-l", str(cache)], capture_output=True)
    shutil.rmtree(work, ignore_errors=True)  # kept only when something failed
    # hits continue after a fault: in its wave or the next (a full disk also stops the
    # counter files' writes until it is freed)
    hitless = sum(h["tokens_from_disk"] <= 0 and (i + 1 == len(hits_after_fault) or
                                                   hits_after_fault[i + 1]["tokens_from_disk"] <= 0)
                  for i, h in enumerate(hits_after_fault) if h["fault"])
    targets = {
        "wrong_outputs": {"figure": counts["wrong_outputs"], "goal": "0",
                          "met": counts["wrong_outputs"] == 0, "noise_floor": noise},
        "failed_not_killed": {"figure": counts["failed_not_killed"], "goal": "0",
                              "met": counts["failed_not_killed"] == 0},
        "disk_over_budget_bytes": {"figure": max(0, max_over), "goal": "0",
                                   "met": max_over <= 0},
        "waves_after_a_fault_without_disk_hits": {"figure": hitless, "goal": "0",
                                                  "met": hitless == 0},
    }
    print(f"requests {counts['requests']}, completed {counts['completed']}, faults "
          f"{counts['faults']}, failed on a killed replica {counts['failed_killed']}, other "
          f"failures {counts['failure_reasons'] or 0}; no-offload noise floor {noise}")
    print_targets(targets)
    save(Path(args.out), "soak", quick=args.quick, started=started, targets=targets,
         counts=counts, noise_floor=noise, waves=hits_after_fault,
         tmpfs="mounted" if no_tmpfs is None else f"not mounted, fill skipped: {no_tmpfs}",
         settings={"waves": waves, "budget": args.budget, "rate": args.rate,
                   "shape": vars(shape), "binding": "VLLM_CPU_NUM_OF_RESERVED_CPU=1"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
