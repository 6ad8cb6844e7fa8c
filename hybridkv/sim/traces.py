"""Workloads for the hit-rate simulator, in one namespace: what a trace is, the synthetic
trace generators and JSONL traces.

The names live in one module per idea, re-exported here (``from hybridkv.sim.traces
import ...`` is the simulator's and the tools' entry point):

- ``trace_model``: ``Request``, ``Trace`` (prefix ids, non-decreasing timestamps),
  ``working_set_tokens``, ``prefix_stats``;
- ``trace_builder``: ``Builder``, how generators assemble prompts and prefix ids;
- ``workloads``: the four trace families, ``GENERATORS``, ``SCALES``, ``make_trace``;
- ``jsonl``: ``save_jsonl``, ``load_jsonl``, ``token_hash_ids``.

Imports no vLLM and no torch.
"""

from __future__ import annotations

from hybridkv.sim.jsonl import load_jsonl, save_jsonl, token_hash_ids
from hybridkv.sim.trace_builder import Builder
from hybridkv.sim.trace_model import Request, Trace, prefix_stats, working_set_tokens
from hybridkv.sim.workloads import (
    GENERATORS,
    SCALES,
    agentic_branching,
    long_document_qa,
    make_trace,
    multi_turn_chat,
    shared_system_prompts,
)

__all__ = [
    "Request",
    "Trace",
    "multi_turn_chat",
    "shared_system_prompts",
    "agentic_branching",
    "long_document_qa",
    "GENERATORS",
    "SCALES",
    "make_trace",
    "save_jsonl",
    "load_jsonl",
    "token_hash_ids",
    "working_set_tokens",
    "prefix_stats",
    "Builder",
]
