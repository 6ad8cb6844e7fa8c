"""``python -m hybridkv.testing.session``: one scripted engine lifetime (tests only).

The production session (``hybridkv.vllm.session``) plus what the engine-level
tests need: prompts' ``before`` / ``after`` actions (``FaultPlan``) and, with
``--faults-file``, the fault-injecting connector reading that rules file (the
``faults`` action rewrites it while the engine runs). Same arguments and
report as the production session otherwise.
"""

from __future__ import annotations

from functools import partial

from hybridkv.vllm.session import arguments, run_from_args

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    p = arguments(__doc__)
    p.add_argument("--faults-file", default=None,
                   help="rules file for FaultInjectingConnector (may not exist yet: no faults)")
    a = p.parse_args(argv)
    hooks = {"plan_factory": partial(_plan, faults_file=a.faults_file)}
    if a.faults_file is not None:
        from hybridkv.testing.connector import transfer_config

        hooks["adapt_transfer_config"] = partial(transfer_config, faults=a.faults_file)
    run_from_args(a, **hooks)


def _plan(llm, cache_dir, *, faults_file):
    from hybridkv.testing.faultplan import FaultPlan

    return FaultPlan(llm, cache_dir, faults_file=faults_file)


if __name__ == "__main__":
    main()
