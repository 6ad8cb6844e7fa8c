"""One offline ``vllm.LLM`` lifetime: start it, greedy sampling, shut it down for real.

What the demo session (``hybridkv.demo.session``) and the test sessions
(``hybridkv.testing.session``) need from vLLM to run prompts in-process; vLLM is
imported only when an engine is opened.

Invariant: when ``close_engine`` returns, the engine's processes have shut down
(within ``SHUTDOWN_TIMEOUT_S``), so every hybridkv counter file and index snapshot
they write on shutdown is on disk.
"""

from __future__ import annotations

import inspect
import os
import time
from typing import Any

__all__ = ["SHUTDOWN_TIMEOUT_S", "close_engine", "open_engine", "sampling_params"]

#: how long ``close_engine`` lets the engine's processes shut down before vLLM kills them
SHUTDOWN_TIMEOUT_S = 60.0


def open_engine(kwargs: dict[str, Any], extra_engine_args: dict[str, Any] | None = None):
    """``(llm, startup_s)``: a started ``vllm.LLM``."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    started = time.perf_counter()
    llm = LLM(**kwargs, **(extra_engine_args or {}))
    return llm, time.perf_counter() - started


def sampling_params(max_tokens: int):
    """Greedy, ``max_tokens`` generated whatever the model says (no EOS stop)."""
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def close_engine(llm, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
    """Shut the engine down; return once its processes have exited (or ``timeout`` s passed).

    vLLM's client shutdown sends the engine-core process SIGTERM and joins it; that
    process shuts its workers down, then its scheduler, and each hybridkv worker and
    manager writes its counters, forced (``Counters.flush(force=True)``), and the
    manager its index snapshot, as it shuts down. vLLM's own grace (5 s) can be shorter
    than that teardown on a loaded CPU (measured on 2 busy cores: the worker exited after
    3 s and vLLM killed the engine core, still tearing down, at 5 s; given 60 s it exited
    by itself after 6.3 s), hence ``timeout``.
    A vLLM without that client method runs the same shutdown (with its own grace) as a
    finalizer when the caller drops its last reference to ``llm``.
    """
    client = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    shutdown = getattr(client, "shutdown", None)
    if not callable(shutdown):
        return
    if "timeout" in inspect.signature(shutdown).parameters:
        shutdown(timeout=timeout)
    else:
        shutdown()
