"""Operator commands over a cache directory: ``inspect``, ``verify``, ``gc``, ``simulate``.

``add_parsers`` adds them to ``hybridkv``'s argument parser and ``run`` executes
one. Every command checks its arguments first and fails with ONE line naming the
bad value (exit status 2), never a traceback; ``--json`` prints one JSON document
on stdout; progress bars go to stderr only when it is a terminal and ``--json``
is off. Imports no vLLM.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import types

from hybridkv.tools.common import ToolError

__all__ = ["COMMANDS", "add_parsers", "run", "ToolError"]

COMMANDS = ("inspect", "verify", "gc", "simulate")

_GC_EPILOG = """\
Safe while engines run: deleting a chunk an engine is about to load is a miss there
(the load fails closed and the engine recomputes), never wrong output; that engine
keeps counting the chunk against its budget until it notices the file is gone.
Do not pass --other-fingerprints for a layout an engine still uses: its chunks go.
"""


def _one_line_error(parser: argparse.ArgumentParser, message: str):
    """argparse's error, as one line (no usage block)."""
    sys.stderr.write(f"{parser.prog}: error: {message}\n")
    sys.exit(2)


def _parser(sub, name: str, **kwargs) -> argparse.ArgumentParser:
    p = sub.add_parser(name, **kwargs)
    p.error = types.MethodType(_one_line_error, p)  # type: ignore[method-assign]
    p.add_argument("--json", action="store_true",
                   help="print one JSON document on stdout (no progress bar)")
    return p


def add_parsers(sub) -> None:
    """Add the operator subcommands to ``hybridkv``'s subparsers."""
    i = _parser(sub, "inspect", help="what a cache directory holds, per layout fingerprint")
    i.add_argument("--cache-dir", required=True)
    i.add_argument("--budget", default=None, help="disk budget (e.g. 200GiB) to report use against")
    i.add_argument("--min-free-space", default=None,
                   help="the engines' min_free_space (e.g. 10GiB or 5%%) to report the "
                        "floor of (default: hybridkv's default floor)")
    i.add_argument("--fingerprint", action="append", default=[],
                   help="only this layout directory (repeatable)")

    v = _parser(sub, "verify", help="check every chunk file's header and checksum; exit 1 "
                                    "when a file is bad")
    v.add_argument("--cache-dir", required=True)
    v.add_argument("--quarantine", action="store_true",
                   help="move bad files to <layout>/quarantine/ (as an engine would)")
    v.add_argument("--workers", type=int, default=8, help="reader threads (default 8)")
    v.add_argument("--integrity-key-file", default=None,
                   help="key of a cache written with integrity_key_file (checks the tags too)")
    v.add_argument("--fingerprint", action="append", default=[],
                   help="only this layout directory (repeatable)")

    g = _parser(sub, "gc", help="offline eviction to a budget, stale temp files, quarantine",
                epilog=_GC_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--cache-dir", required=True)
    g.add_argument("--budget", default=None,
                   help="evict each rank's chunks down to this size (e.g. 200GiB) with --policy")
    g.add_argument("--policy", default="group_aware",
                   help="eviction policy, as eviction_policy (default group_aware)")
    g.add_argument("--dry-run", action="store_true", help="report what would go; change nothing")
    g.add_argument("--purge-quarantine", action="store_true",
                   help="delete the files under <layout>/quarantine/")
    g.add_argument("--fingerprint", action="append", default=[],
                   help="the layout directory to clean (repeatable; default all); with "
                        "--other-fingerprints, the ones kept")
    g.add_argument("--other-fingerprints", action="store_true",
                   help="delete every layout directory not named by --fingerprint")

    s = _parser(sub, "simulate", help="capacity planning: hit rate against disk budget per "
                                      "policy for your model and traffic")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", default=None, help="JSONL trace (Mooncake hash_ids or tokens)")
    src.add_argument("--generator", default=None,
                     help="synthetic trace: multi_turn, shared_system, agentic, document_qa")
    mdl = s.add_mutually_exclusive_group(required=True)
    mdl.add_argument("--model", default=None,
                     help="preset layout: gemma3_27b, jamba_mini, qwen3_next_80b")
    mdl.add_argument("--hf-config", default=None,
                     help="the model's Hugging Face config.json (or its directory)")
    s.add_argument("--budgets", default="10%,25%,50%,100%",
                   help="sizes or shares of the working set (default 10%%,25%%,50%%,100%%)")
    s.add_argument("--policies", default="group_aware,lru",
                   help="comma-separated (group_aware, lru, watermark, reference)")
    s.add_argument("--plot", default=None, help="save a PNG of hit rate against budget here")
    s.add_argument("--block-tokens", type=int, default=64,
                   help="tokens per hash id of --trace / the generator (default 64; "
                        "Mooncake traces: 512)")
    s.add_argument("--scale", default="quick", help="generator scale: quick, full, large")
    s.add_argument("--seed", type=int, default=0, help="generator seed")
    s.add_argument("--jobs", type=int, default=1, help="worker processes for the replays")


def _execute(args) -> tuple[dict, str, int]:
    show = not args.json
    if args.cmd == "inspect":
        from hybridkv.tools import inspect as mod
        from hybridkv.tools.common import parse_budget, parse_min_free_space

        report = mod.inspect_cache(args.cache_dir, budget=parse_budget(args.budget),
                                   fingerprints=tuple(args.fingerprint), show_progress=show,
                                   min_free_space=parse_min_free_space(args.min_free_space))
        return report, mod.format_report(report), 0
    if args.cmd == "verify":
        from hybridkv.tools import verify as mod

        key = mod.read_integrity_key(args.integrity_key_file)
        report = mod.verify_cache(args.cache_dir, quarantine=args.quarantine,
                                  workers=args.workers, key=key,
                                  fingerprints=tuple(args.fingerprint), show_progress=show)
        return report, mod.format_report(report), 1 if report["bad"] else 0
    if args.cmd == "gc":
        from hybridkv.tools import gc as mod
        from hybridkv.tools.common import parse_budget

        report = mod.gc_cache(args.cache_dir, budget=parse_budget(args.budget),
                              policy=args.policy, dry_run=args.dry_run,
                              purge_quarantine=args.purge_quarantine,
                              fingerprints=tuple(args.fingerprint),
                              other_fingerprints=args.other_fingerprints, show_progress=show)
        return report, mod.format_report(report), 0
    from hybridkv.tools import simulate as mod

    report = mod.run(args, show)
    text = mod.format_report(report)
    if report.get("plot"):
        text += f"\nplot saved to {report['plot']}"
    return report, text, 0


def run(args, rest: list[str]) -> int:
    """Run one operator command; ``ToolError`` -> one line on stderr, exit status 2."""
    if rest:
        _one_line_error(argparse.ArgumentParser(prog=f"hybridkv {args.cmd}"),
                        f"unrecognized arguments: {' '.join(rest)}")
    logging.getLogger("hybridkv").addHandler(logging.NullHandler())  # reports say it all
    try:
        report, text, status = _execute(args)
    except ToolError as exc:
        sys.stderr.write(f"hybridkv {args.cmd}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"hybridkv {args.cmd}: interrupted\n")
        return 130
    try:
        if args.json:
            sys.stdout.write(json.dumps(report, indent=1, default=str) + "\n")
        else:
            sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # `... | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return status
