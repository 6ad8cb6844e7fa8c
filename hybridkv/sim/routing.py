"""Multi-replica simulation: N replicas, each with its own hybridkv store, behind a router.

Each replica runs what ``sim.replay`` runs for one engine (its own
``ChunkIndex`` + ``Capacity`` with a disk budget, hits by
``hit_rule.servable_tokens``); the router sees every replica's store as KV
events would show it (lossless here) and sends each request to one replica:

- ``hybrid_aware``: the replica with most tokens under the hybrid hit rule
  (``hybridkv.routing``'s scorer on the same index): it promises what it gets;
  among equals, the one whose full-attention group holds the longest prefix
  (affinity: the rest of the request is stored next to it; promised: nothing);
- ``full_attention_only``: the replica whose full-attention group holds the
  longest prefix (what group-agnostic routers score), promising that prefix;
- ``round_robin``: in turn; it promises nothing.
Ties (most often: nothing anywhere) go to the replica that computed the fewest
prefill tokens over the last ``8 x replicas`` requests, then the lowest number.

Reported per trace and layout: token hit rate, tokens promised but not served
(sum over requests of ``max(0, promised - served)``) and the requests that
over-promised, and load imbalance: the busiest replica's prefill tokens
computed (prompt minus hit) over the mean (1.0 = even).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import msgspec

from hybridkv.capacity import DEFAULT_HEADROOM, Capacity
from hybridkv.groups import GroupKind
from hybridkv.hit_rule import servable_tokens
from hybridkv.index import ChunkIndex
from hybridkv.policies import make_policy
from hybridkv.policies.base import Candidate, RequestView
from hybridkv.sim.layouts import SimModel
from hybridkv.sim.reference import hit_keys
from hybridkv.sim.replay import request_keys
from hybridkv.sim.traces import Trace

__all__ = ["ROUTERS", "FleetResult", "replay_fleet", "summarize"]

ROUTERS = ("hybrid_aware", "full_attention_only", "round_robin")


class FleetResult(msgspec.Struct, kw_only=True):
    trace: str
    model: str
    router: str
    replicas: int
    budget_bytes: int | None
    requests: int
    prompt_tokens: int
    hit_tokens: int
    token_hit_rate: float
    promised_tokens: int
    promised_not_served: int
    overpromised_requests: int
    load_imbalance: float
    computed_per_replica: list[int]
    requests_per_replica: list[int]


class _Replica:
    """One engine's disk tier: the replay loop of ``sim.replay`` for the requests it gets."""

    def __init__(self, model: SimModel, policy: str, budget: int | None, headroom: float) -> None:
        self.model = model
        self.index = ChunkIndex()
        pol = make_policy(policy, model.layout, cost=model.cost)
        self.capacity = Capacity(self.index, pol, budget, headroom=headroom)
        self.served = 0

    def servable(self, by_group: dict[int, list[bytes]], n: int) -> int:
        return servable_tokens(self.model.layout.groups,
                               lambda g, i: by_group[g][i] in self.index, n)

    def full_prefix(self, by_group: dict[int, list[bytes]], n: int) -> int:
        """Tokens of the longest prefix the full-attention groups hold (a group-agnostic score)."""
        best = n
        for g in self.model.layout.groups:
            if g.kind is not GroupKind.FULL:
                continue
            run = 0
            for k in by_group[g.index]:
                if k not in self.index:
                    break
                run += 1
            best = min(best, run * g.chunk_tokens)
        return best

    def serve(self, keys: list[list[bytes]], n: int) -> int:
        groups = self.model.layout.groups
        by_group = {g.index: k for g, k in zip(groups, keys)}
        hit = self.servable(by_group, n)
        loaded = hit_keys(groups, keys, hit)
        if loaded:
            self.capacity.load(loaded)
            self.capacity.load_done(loaded)
        positions = {k: (i + 1) * g.chunk_tokens
                     for g, gkeys in zip(groups, keys) for i, k in enumerate(gkeys)}
        batch = [Candidate(k, g.index, (i + 1) * g.chunk_tokens, g.chunk_bytes,
                           gkeys[i - 1] if i else None)
                 for g, gkeys in zip(groups, keys) for i, k in enumerate(gkeys)
                 if (i + 1) * g.chunk_tokens > hit and k not in self.index]
        rid = f"r{self.served}"
        self.served += 1
        plan = self.capacity.offer(batch, RequestView(rid, positions, n))
        for cand in plan.admitted:
            self.capacity.commit(cand.key, size=cand.size, position=cand.position,
                                 parent=cand.parent)
        self.capacity.request_finished(rid)
        self.capacity.enforce()
        return hit


def replay_fleet(trace: Trace, model: SimModel, router: str, *, replicas: int = 4,
                 budget: int | None = None, policy: str = "group_aware",
                 headroom: float = DEFAULT_HEADROOM) -> FleetResult:
    """Route ``trace`` over ``replicas`` replicas (``budget`` bytes of disk each; None: unbounded)."""
    if router not in ROUTERS:
        raise ValueError(f"unknown router {router!r}; valid: {', '.join(ROUTERS)}")
    if replicas <= 0:
        raise ValueError(f"replicas must be positive, got {replicas}")
    fleet = [_Replica(model, policy, budget, headroom) for _ in range(replicas)]
    groups = model.layout.groups
    recent: deque[tuple[int, int]] = deque(maxlen=8 * replicas)  # (replica, computed)
    window_load = [0] * replicas
    computed = [0] * replicas
    sent = [0] * replicas
    hit_total = prompt_total = promised_total = over_total = over_requests = 0
    for n_req, req in enumerate(trace.requests):
        keys = request_keys(req, model, trace.block_tokens)
        by_group = {g.index: k for g, k in zip(groups, keys)}
        n = req.input_length
        if router == "round_robin":
            choice, promised = n_req % replicas, 0
        else:
            prefix = [r.full_prefix(by_group, n) for r in fleet]
            scores = [r.servable(by_group, n) for r in fleet] if router == "hybrid_aware" \
                else prefix
            choice = max(range(replicas),
                         key=lambda i: (scores[i], prefix[i], -window_load[i], -i))
            promised = scores[choice]
        hit = fleet[choice].serve(keys, n)
        over = max(0, promised - hit)
        over_total += over
        over_requests += over > 0
        promised_total += promised
        hit_total += hit
        prompt_total += n
        sent[choice] += 1
        computed[choice] += n - hit
        if len(recent) == recent.maxlen:
            old, c = recent[0]
            window_load[old] -= c
        recent.append((choice, n - hit))
        window_load[choice] += n - hit
    mean = sum(computed) / replicas
    return FleetResult(
        trace=trace.name, model=model.name, router=router, replicas=replicas,
        budget_bytes=budget, requests=len(trace.requests), prompt_tokens=prompt_total,
        hit_tokens=hit_total, token_hit_rate=hit_total / max(1, prompt_total),
        promised_tokens=promised_total, promised_not_served=over_total,
        overpromised_requests=over_requests,
        load_imbalance=max(computed) / mean if mean else 1.0,
        computed_per_replica=computed, requests_per_replica=sent)


def summarize(results: Sequence[FleetResult]) -> dict[str, dict[str, float]]:
    """Per router: overall token hit rate, tokens promised but not served, worst imbalance."""
    out: dict[str, dict[str, float]] = {}
    for name in ROUTERS:
        rs = [r for r in results if r.router == name]
        if not rs:
            continue
        out[name] = {
            "token_hit_rate": sum(r.hit_tokens for r in rs) / max(1, sum(r.prompt_tokens for r in rs)),
            "promised_not_served": sum(r.promised_not_served for r in rs),
            "overpromised_requests": sum(r.overpromised_requests for r in rs),
            "worst_load_imbalance": max(r.load_imbalance for r in rs),
        }
    return out
