"""Replay a trace against a capacity policy, exactly as the vLLM manager would run it.

For each request in order: look up its chunk keys (one per group per complete
256-token chunk), compute the hit every group can serve with
``hit_rule.servable_tokens`` (the rule vLLM's connector applies), load and
touch those chunks, then offer every chunk past the hit to
``capacity.Capacity`` (the same object the vLLM manager drives) and store what
it admits. Nothing is written to disk: chunks are sizes in a ``ChunkIndex``.
The engine's own GPU prefix cache is not modelled (every hit is a disk hit).

Invariants checked on every step (``check=True``, used by tests): the budget
holds, and every reported hit is servable by every group from the index.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
import xxhash

from hybridkv.capacity import DEFAULT_HEADROOM, Capacity
from hybridkv.hit_rule import servable_tokens
from hybridkv.index import ChunkIndex
from hybridkv.keys import key_group, make_key
from hybridkv.policies import make_policy
from hybridkv.policies.base import Candidate, RequestView
from hybridkv.sim.layouts import SimModel
from hybridkv.sim.reference import ReferencePolicy, hit_keys
from hybridkv.sim.traces import Request, Trace

__all__ = ["GroupStats", "SimResult", "REFERENCE", "UNBOUNDED", "replay", "request_keys",
           "working_set_bytes"]

#: pseudo-policy: no budget, store everything (the upper bound)
UNBOUNDED = "unbounded"
#: the offline policy that knows the whole trace (``hybridkv.sim.reference``)
REFERENCE = "reference"


class GroupStats(msgspec.Struct, kw_only=True):
    chunks_written: int = 0
    bytes_written: int = 0
    chunks_read: int = 0
    bytes_read: int = 0
    chunks_evicted: int = 0


class SimResult(msgspec.Struct, kw_only=True):
    trace: str
    model: str
    policy: str
    budget_bytes: int | None
    budget_fraction: float | None
    requests: int
    prompt_tokens: int
    hit_tokens: int
    token_hit_rate: float
    flops_total: float
    flops_saved: float
    bytes_written: int
    bytes_read: int
    peak_bytes: int
    stores_rejected: int
    stores_skipped: int
    #: eviction decisions on the store path (each scans the index once)
    victim_calls: int
    groups: dict[str, GroupStats]
    wall_s: float = 0.0

    @property
    def bytes_written_per_hit_token(self) -> float:
        return self.bytes_written / max(1, self.hit_tokens)


def request_keys(req: Request, model: SimModel, block_tokens: int) -> list[list[bytes]]:
    """Per group (in layout order), the chunk keys of the request's complete chunks.

    A key names the chunk's whole prefix. Blocks that divide the chunk: the id of the
    chunk's last block. Blocks a multiple of the chunk: xxh3 of the id of the block
    holding the chunk and the chunk's index inside it (equal exactly when the prefixes
    are, as block ids are); a partial last block gives only its complete chunks.
    """
    out = []
    for g in model.layout.groups:
        c = g.chunk_tokens
        n = req.input_length // c
        if c % block_tokens == 0:
            per = c // block_tokens
            # a prefix id names the whole prefix: the chunk's last block id is its hash
            hashes = [req.hash_ids[(i + 1) * per - 1].to_bytes(8, "big") for i in range(n)]
        elif block_tokens % c == 0:
            per = block_tokens // c
            hashes = [_sub_block_hash(req.hash_ids[i // per], i % per) for i in range(n)]
        else:
            raise ValueError(f"{block_tokens}-token blocks neither divide nor are a multiple "
                             f"of group {g.index}'s {c}-token chunks")
        out.append([make_key(h, g.index) for h in hashes])
    return out


def _sub_block_hash(block_id: int, i: int) -> bytes:
    """The hash of the ``i``-th chunk inside the block ``block_id`` (8 bytes)."""
    return xxhash.xxh3_64_digest(block_id.to_bytes(8, "big") + i.to_bytes(4, "big"))


def working_set_bytes(trace: Trace, model: SimModel) -> int:
    """Bytes of every distinct chunk of every group the trace produces (store everything)."""
    seen: set[bytes] = set()
    total = 0
    sizes = {g.index: g.chunk_bytes for g in model.layout.groups}
    for req in trace.requests:
        for g, keys in zip(model.layout.groups, request_keys(req, model, trace.block_tokens)):
            for k in keys:
                if k not in seen:
                    seen.add(k)
                    total += sizes[g.index]
    return total


@dataclass
class _Run:
    model: SimModel
    capacity: Capacity
    check: bool
    stats: dict[int, GroupStats] = field(default_factory=dict)
    peak: int = 0


def replay(trace: Trace, model: SimModel, policy: str, budget: int | None, *,
           budget_fraction: float | None = None, checkpoint_interval: int = 0,
           alpha: float = 1.0, headroom: float = DEFAULT_HEADROOM,
           check: bool = False) -> SimResult:
    """Run ``trace`` through ``policy`` under ``budget`` bytes (None: unbounded)."""
    import time

    started = time.perf_counter()
    layout = model.layout
    index = ChunkIndex()
    all_keys = None
    if policy == REFERENCE:
        # it knows every request; it frees exactly what it needs (headroom only amortises
        # the search cost of the online policies)
        all_keys = [request_keys(r, model, trace.block_tokens) for r in trace.requests]
        pol = ReferencePolicy(layout, all_keys, [r.input_length for r in trace.requests],
                              budget)
        headroom = 0.0
    else:
        pol = make_policy("lru" if policy == UNBOUNDED else policy, layout, cost=model.cost,
                          checkpoint_interval=checkpoint_interval, alpha=alpha)
    cap = Capacity(index, pol, None if policy == UNBOUNDED else budget, headroom=headroom)
    stats = {g.index: GroupStats() for g in layout.groups}
    groups = layout.groups
    hit_tokens = prompt_tokens = rejected = skipped = peak = 0
    flops_total = flops_saved = 0.0
    for n, req in enumerate(trace.requests):
        if all_keys is not None:
            pol.advance(n)
            keys = all_keys[n]
        else:
            keys = request_keys(req, model, trace.block_tokens)
        by_group = {g.index: k for g, k in zip(groups, keys)}
        hit = servable_tokens(groups, lambda g, i: by_group[g][i] in index, req.input_length)
        loaded = hit_keys(groups, keys, hit)
        for k in loaded:
            entry = index.get(k)
            if check:
                assert entry is not None, "a reported hit needs a chunk that is not stored"
            g = stats[key_group(k)]
            g.chunks_read += 1
            g.bytes_read += entry.size
        if loaded:  # a simulated read completes at once
            cap.load(loaded)
            cap.load_done(loaded)
        prompt_tokens += req.input_length
        hit_tokens += hit
        flops_total += model.cost.prefill_flops(req.input_length)
        flops_saved += model.cost.prefill_flops(hit)

        positions = {k: (i + 1) * g.chunk_tokens
                     for g, gkeys in zip(groups, keys) for i, k in enumerate(gkeys)}
        batch = []
        for g, gkeys in zip(groups, keys):
            for i, k in enumerate(gkeys):
                if (i + 1) * g.chunk_tokens > hit and k not in index:
                    batch.append(Candidate(k, g.index, (i + 1) * g.chunk_tokens, g.chunk_bytes,
                                           gkeys[i - 1] if i else None))
        rid = f"r{n}"
        plan = cap.offer(batch, RequestView(rid, positions, req.input_length))
        rejected += len(plan.rejected)
        skipped += len(plan.skipped)
        evicted = list(plan.evicted)
        peak = max(peak, index.bytes_used)
        for cand in plan.admitted:
            evicted += cap.commit(cand.key, size=cand.size, position=cand.position,
                                  parent=cand.parent)
            stats[cand.group].chunks_written += 1
            stats[cand.group].bytes_written += cand.size
        cap.request_finished(rid)
        evicted += cap.enforce()
        for k in evicted:
            stats[key_group(k)].chunks_evicted += 1
        if check and cap.budget is not None:
            assert index.bytes_used <= cap.budget, "budget exceeded"
    return SimResult(
        trace=trace.name, model=model.name, policy=policy, budget_bytes=budget,
        budget_fraction=budget_fraction, requests=len(trace.requests),
        prompt_tokens=prompt_tokens, hit_tokens=hit_tokens,
        token_hit_rate=hit_tokens / max(1, prompt_tokens),
        flops_total=flops_total, flops_saved=flops_saved,
        bytes_written=sum(s.bytes_written for s in stats.values()),
        bytes_read=sum(s.bytes_read for s in stats.values()),
        peak_bytes=peak, stores_rejected=rejected, stores_skipped=skipped,
        victim_calls=cap.victim_calls,
        groups={f"{g.index}:{g.kind.value}": stats[g.index] for g in groups},
        wall_s=time.perf_counter() - started)
