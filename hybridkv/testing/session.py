"""``python -m hybridkv.testing.session``: one scripted engine lifetime (tests only).

The demo session (``hybridkv.demo.session``) plus what the engine-level tests
need: prompts' ``before`` / ``after`` actions (``FaultPlan``), run in this
front-end process while the engine runs; with ``--faults-file``, the
fault-injecting connector reading that rules file (the ``faults`` action
rewrites it); ``--max-model-len``. Same arguments as the demo session otherwise.

The report is the demo session's plus, per request, this engine's own hybridkv
counters after its ``after`` actions (``stats``), the plan's ``report()``
(``plan``) and the counters once the engine has shut down (``final_stats``). A
request that vLLM ends with an error is reported (``finish_reason:
"exception"``, ``error``) instead of ending the session.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from hybridkv.demo import session
from hybridkv.vllm.offline import close_engine, open_engine, sampling_params

__all__ = ["main", "run_scripted_session"]


def run_scripted_session(model: str, cache_dir: str | None, prompts: list, *,
                         max_tokens: int = 8, settings: dict[str, Any] | None = None,
                         extra_engine_args: dict[str, Any] | None = None,
                         load_failure_policy: str | None = None,
                         faults_file: str | None = None,
                         max_model_len: int = session.DEFAULT_MAX_MODEL_LEN) -> dict[str, Any]:
    """Run ``prompts`` with their actions; the report described in the module docstring."""
    from hybridkv.testing.faultplan import FaultPlan

    kwargs = session.session_kwargs(model, cache_dir, settings=settings,
                                    load_failure_policy=load_failure_policy,
                                    max_model_len=max_model_len)
    if faults_file is not None and "kv_transfer_config" in kwargs:
        from hybridkv.testing.connector import transfer_config

        kwargs["kv_transfer_config"] = transfer_config(kwargs["kv_transfer_config"],
                                                       faults=faults_file)
    llm, startup = open_engine(kwargs, extra_engine_args)
    params = sampling_params(max_tokens)
    plan = FaultPlan(llm, cache_dir, faults_file=faults_file)
    results = []
    for entry in prompts:
        spec = session.as_spec(entry)
        plan.run(spec.get("before", []))
        result = _request(llm, spec, params)
        plan.run(spec.get("after", []))
        result["stats"] = plan.own_stats()
        results.append(result)
    report: dict[str, Any] = {"startup_s": startup, "requests": results, "plan": plan.report()}
    close_engine(llm)
    del llm
    report["final_stats"] = plan.finish()
    return report


def _request(llm, spec: dict[str, Any], params) -> dict[str, Any]:
    """``session.generate``, or the report of a request vLLM ended with an error."""
    t0 = time.perf_counter()
    try:
        return session.generate(llm, spec, params)
    except Exception as exc:
        wall = time.perf_counter() - t0
        return {"prompt_tokens": len(spec["prompt"]), "label": spec.get("label"), "output": [],
                "num_cached_tokens": 0, "finish_reason": "exception",
                "error": f"{type(exc).__name__}: {exc}", "wall_s": wall, "ttft_s": wall}


def main(argv: list[str] | None = None) -> None:
    p = session.arguments(__doc__)
    p.add_argument("--faults-file", default=None,
                   help="rules file for FaultInjectingConnector (may not exist yet: no faults)")
    p.add_argument("--max-model-len", type=int, default=session.DEFAULT_MAX_MODEL_LEN)
    a = p.parse_args(argv)
    prompts, kwargs = session.session_args(a)
    report = run_scripted_session(a.model, a.cache_dir, prompts, faults_file=a.faults_file,
                                  max_model_len=a.max_model_len, **kwargs)
    Path(a.out).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
