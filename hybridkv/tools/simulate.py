"""``hybridkv simulate``: capacity planning, token hit rate against disk budget per policy.

The model is a simulator preset (``hybridkv.sim.layouts``) or derived from the
user's Hugging Face ``config.json`` (``hybridkv.sim.hf_layout``); the workload is a
JSONL trace (Mooncake format or token ids, ``hybridkv.sim.traces.load_jsonl``) or a
named generator. Every (policy, budget) cell is one ``hybridkv.sim.replay.replay``,
the replay ``benchmarks/hit_rate.py`` runs: the same ``Capacity`` and policy code as
the engine, the real hit rule, no files. Budgets are sizes (``50GiB``) or shares of
the trace's working set (``25%``: of what an unbounded store would hold). An
unbounded replay gives the ceiling.

Invariant: every argument is checked (trace, model, budgets, policies, plot
path and matplotlib) before the first replay runs.
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

from hybridkv.policies import policy_names
from hybridkv.sim.layouts import SIM_MODELS, SimModel
from hybridkv.sim.replay import REFERENCE, UNBOUNDED, replay, working_set_bytes
from hybridkv.sim.traces import GENERATORS, SCALES, Trace, load_jsonl, make_trace
from hybridkv.tools.common import ToolError, human_bytes, progress

__all__ = ["Budget", "parse_budgets", "parse_policies", "load_model", "load_trace", "simulate",
           "format_report", "plot"]

DEFAULT_BUDGETS = "10%,25%,50%,100%"
DEFAULT_POLICIES = "group_aware,lru"
#: a budget "reaches" the ceiling when its hit rate is at least this share of unbounded's
CEILING_SHARE = 0.9


@dataclass(frozen=True)
class Budget:
    label: str
    fraction: float | None = None  # of the working set
    size: int | None = None  # bytes

    def bytes_for(self, working_set: int) -> int:
        return self.size if self.size is not None else int(working_set * self.fraction)


def parse_budgets(text: str) -> list[Budget]:
    from hybridkv.config import ConfigError, parse_size

    out = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        if item.endswith("%"):
            try:
                pct = float(item[:-1])
            except ValueError:
                raise ToolError(f"--budgets: {item!r} is not a percentage like 25%") from None
            if not 0 < pct <= 1000:
                raise ToolError(f"--budgets: {item!r} must be above 0% (and at most 1000%)")
            out.append(Budget(item, fraction=pct / 100))
        else:
            try:
                size = parse_size(item, "--budgets")
            except ConfigError as exc:
                raise ToolError(str(exc)) from None
            if size <= 0:
                raise ToolError(f"--budgets: {item!r} must be positive")
            out.append(Budget(item, size=size))
    if not out:
        raise ToolError(f"--budgets {text!r}: no budget given")
    return out


def parse_policies(text: str) -> list[str]:
    valid = (*policy_names(), REFERENCE)
    names = [s.strip() for s in text.split(",") if s.strip()]
    for n in names:
        if n not in valid:
            raise ToolError(f"--policies: unknown policy {n!r}; choose from {', '.join(valid)}")
    if not names:
        raise ToolError(f"--policies {text!r}: no policy given")
    return list(dict.fromkeys(names))


def load_model(preset: str | None, hf_config: str | None) -> SimModel:
    if (preset is None) == (hf_config is None):
        raise ToolError("give exactly one of --model PRESET and --hf-config config.json")
    if preset is not None:
        if preset not in SIM_MODELS:
            raise ToolError(f"--model {preset}: unknown preset; choose one of "
                            f"{', '.join(SIM_MODELS)} or pass --hf-config")
        return SIM_MODELS[preset]
    from hybridkv.sim.hf_layout import HFConfigError, sim_model_from_hf_config

    try:
        return sim_model_from_hf_config(hf_config)
    except HFConfigError as exc:
        raise ToolError(f"--hf-config {exc}") from None


def load_trace(path: str | None, generator: str | None, *, scale: str = "quick",
               seed: int = 0, block_tokens: int = 64) -> Trace:
    if (path is None) == (generator is None):
        raise ToolError("give exactly one of --trace F.jsonl and --generator NAME")
    if block_tokens < 1:
        raise ToolError(f"--block-tokens {block_tokens}: must be at least 1")
    if generator is not None:
        if generator not in GENERATORS:
            raise ToolError(f"--generator {generator}: unknown; choose one of "
                            f"{', '.join(GENERATORS)}")
        if scale not in SCALES:
            raise ToolError(f"--scale {scale}: choose one of {', '.join(SCALES)}")
        return make_trace(generator, scale=scale, seed=seed, block_tokens=block_tokens)
    if not Path(path).is_file():
        raise ToolError(f"--trace {path}: no such file")
    try:
        trace = load_jsonl(path, block_tokens=block_tokens)
    except (OSError, ValueError) as exc:
        raise ToolError(f"--trace {exc}") from None
    if not trace.requests:
        raise ToolError(f"--trace {path}: no requests in the file")
    return trace


def _check_blocks(trace: Trace, model: SimModel) -> None:
    b = trace.block_tokens
    for g in model.layout.groups:
        if g.chunk_tokens % b and b % g.chunk_tokens:
            raise ToolError(f"--block-tokens {b}: neither divides the model's "
                            f"{g.chunk_tokens}-token chunks nor is a multiple of them")


def _check_plot(path: str | None) -> None:
    if path is None:
        return
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise ToolError(f"--plot {path}: directory {parent} does not exist")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ToolError("--plot needs matplotlib: pip install 'hybridkv[plot]' "
                        "(or drop --plot)") from None


_WORK: tuple[Trace, SimModel] | None = None


def _init(trace: Trace, model: SimModel) -> None:
    global _WORK
    _WORK = (trace, model)


def _cell(cell: tuple[str, str | None, int | None, float | None]) -> dict:
    policy, label, budget, fraction = cell
    assert _WORK is not None
    trace, model = _WORK
    r = replay(trace, model, policy, budget, budget_fraction=fraction)
    return {"policy": policy, "budget": label, "budget_bytes": budget,
            "budget_fraction": fraction, "token_hit_rate": r.token_hit_rate,
            "hit_tokens": r.hit_tokens, "prompt_tokens": r.prompt_tokens,
            "flops_saved_fraction": r.flops_saved / r.flops_total if r.flops_total else 0.0,
            "bytes_written": r.bytes_written, "bytes_read": r.bytes_read,
            "peak_bytes": r.peak_bytes, "wall_s": r.wall_s}


def simulate(trace: Trace, model: SimModel, budgets: list[Budget], policies: list[str], *,
             jobs: int = 1, show_progress: bool = False) -> dict:
    """Every policy at every budget, plus the unbounded ceiling; cells in input order."""
    if jobs < 1:
        raise ToolError(f"--jobs {jobs}: must be at least 1")
    _check_blocks(trace, model)
    ws = working_set_bytes(trace, model)
    if ws == 0:
        chunk = min(g.chunk_tokens for g in model.layout.groups)
        raise ToolError(f"trace {trace.name}: no prompt fills one {chunk}-token chunk of "
                        f"{model.name}; there is nothing to cache")
    cells: list[tuple] = [(UNBOUNDED, None, None, None)]
    for b in budgets:
        size = b.bytes_for(ws)
        for p in policies:
            cells.append((p, b.label, size, size / ws if ws else None))
    if jobs == 1:
        _init(trace, model)
        results = list(progress((_cell(c) for c in cells), total=len(cells), desc="replays",
                                enabled=show_progress))
    else:
        with multiprocessing.get_context().Pool(jobs, initializer=_init,
                                                initargs=(trace, model)) as pool:
            results = list(progress(pool.imap(_cell, cells), total=len(cells), desc="replays",
                                    enabled=show_progress))
    ceiling = results[0]
    rows = results[1:]
    reach = {}
    for p in policies:
        ok = [r for r in rows if r["policy"] == p
              and r["token_hit_rate"] >= CEILING_SHARE * ceiling["token_hit_rate"]]
        best = min(ok, key=lambda r: r["budget_bytes"], default=None)
        reach[p] = None if best is None else {"budget": best["budget"],
                                              "budget_bytes": best["budget_bytes"]}
    return {"trace": trace.name, "block_tokens": trace.block_tokens,
            "requests": len(trace.requests), "prompt_tokens": ceiling["prompt_tokens"],
            "model": model.name, "model_description": model.description,
            "groups": [{"index": g.index, "kind": g.kind.value, "window_tokens": g.window_tokens,
                        "layers": len(g.layer_names), "chunk_tokens": g.chunk_tokens,
                        "chunk_bytes": g.chunk_bytes} for g in model.layout.groups],
            "working_set_bytes": ws, "policies": policies,
            "budgets": [b.label for b in budgets], "unbounded": ceiling, "results": rows,
            "ceiling_share": CEILING_SHARE, "smallest_budget_reaching_ceiling": reach}


def format_report(report: dict) -> str:
    lines = [f"model {report['model']}: {report['model_description']}",
             f"trace {report['trace']}: {report['requests']} requests, "
             f"{report['prompt_tokens']} prompt tokens; working set "
             f"{human_bytes(report['working_set_bytes'])}",
             "",
             f"{'budget':>10}{'bytes':>13}" + "".join(f"{p:>14}" for p in report["policies"])]
    by = {(r["budget"], r["policy"]): r for r in report["results"]}
    for label in report["budgets"]:
        first = by[(label, report["policies"][0])]
        lines.append(f"{label:>10}{human_bytes(first['budget_bytes']):>13}"
                     + "".join(f"{by[(label, p)]['token_hit_rate']:>14.3f}"
                               for p in report["policies"]))
    u = report["unbounded"]
    lines.append(f"{'unbounded':>10}{human_bytes(u['bytes_written']):>13}"
                 f"{u['token_hit_rate']:>14.3f}  (ceiling: every chunk kept)")
    lines.append("")
    share = report["ceiling_share"]
    for p, r in report["smallest_budget_reaching_ceiling"].items():
        lines.append(f"{p}: " + (f"{r['budget']} ({human_bytes(r['budget_bytes'])}) is the smallest "
                                 f"budget listed with >= {share:.0%} of the unbounded hit rate"
                                 if r else f"no budget listed reaches {share:.0%} of the "
                                           "unbounded hit rate"))
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """Token hit rate against budget (GiB), one line per policy, the ceiling dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in report["policies"]:
        rows = sorted((r for r in report["results"] if r["policy"] == p),
                      key=lambda r: r["budget_bytes"])
        ax.plot([r["budget_bytes"] / 2**30 for r in rows],
                [r["token_hit_rate"] for r in rows], marker="o", label=p)
    ax.axhline(report["unbounded"]["token_hit_rate"], linestyle="--", color="grey",
               label="unbounded")
    ax.axvline(report["working_set_bytes"] / 2**30, linestyle=":", color="grey", linewidth=1)
    ax.set_xscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.set_xlabel("disk budget (GiB, log scale; dotted: working set)")
    ax.set_ylabel("token hit rate")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{report['model']} on {report['trace']} ({report['requests']} requests)",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args, show_progress: bool) -> dict:
    """Check every argument, then replay (the CLI's entry)."""
    budgets = parse_budgets(args.budgets)
    policies = parse_policies(args.policies)
    model = load_model(args.model, args.hf_config)
    _check_plot(args.plot)
    trace = load_trace(args.trace, args.generator, scale=args.scale, seed=args.seed,
                       block_tokens=args.block_tokens)
    report = simulate(trace, model, budgets, policies, jobs=args.jobs,
                      show_progress=show_progress)
    if args.plot:
        plot(report, args.plot)
        report["plot"] = os.fspath(Path(args.plot).resolve())
    return report
