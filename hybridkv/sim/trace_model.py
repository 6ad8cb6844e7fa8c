"""What a trace is: the prompts as the cache sees them, as block ids (and two measures of one).

A prompt is a sequence of block ids, one per ``block_tokens`` tokens; the last
block may be partial.

Invariants:
- Prefix ids (Mooncake's trace format): a block id names a block's content
  *given its whole prefix*. Two requests share their first k blocks exactly when
  their first k ids are equal; an id never appears after two different prefixes,
  so equal ids at position i imply equal ids at every position before i. A
  partial last block has an id of its own, never the id of a full block, so a
  partial id is never followed by another block.
- Timestamps never decrease over a trace.

Imports no vLLM and no torch.
"""

from __future__ import annotations

from itertools import chain

import msgspec

__all__ = ["Request", "Trace", "prefix_stats", "working_set_tokens"]


class Request(msgspec.Struct, frozen=True, kw_only=True):
    """One prompt as the cache sees it."""

    hash_ids: tuple[int, ...]  # id of each block of the prompt: block i is tokens [i*B, (i+1)*B)
    input_length: int  # prompt tokens; len(hash_ids) == ceil(input_length / B)
    output_length: int = 0
    timestamp: float = 0.0  # seconds since trace start, non-decreasing over a trace
    session: str = ""  # conversation / user / agent id (informational)


class Trace(msgspec.Struct, kw_only=True):
    name: str
    block_tokens: int  # B: tokens per hash_id
    requests: list[Request]


def working_set_tokens(trace: Trace) -> int:
    """Distinct blocks times ``block_tokens``: what a cache holding everything would store."""
    return len(set(chain.from_iterable(r.hash_ids for r in trace.requests))) * trace.block_tokens


def prefix_stats(trace: Trace) -> dict[str, float]:
    """Size of a trace and an upper bound on block reuse.

    ``reused_fraction`` is the share of prompt blocks whose id appeared earlier
    in the trace: the block hit rate of an unbounded cache.
    """
    blocks = sum(len(r.hash_ids) for r in trace.requests)
    distinct = len(set(chain.from_iterable(r.hash_ids for r in trace.requests)))
    return {
        "requests": len(trace.requests),
        "prompt_tokens": sum(r.input_length for r in trace.requests),
        "prompt_blocks": blocks,
        "distinct_blocks": distinct,
        "reused_fraction": 1 - distinct / blocks if blocks else 0.0,
    }
