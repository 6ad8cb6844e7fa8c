"""Score replicas for a request: tokens each can serve per tier, and the pick.

Per tier, the hybrid hit rule (``hit_rule.servable_tokens``) runs on the
replica's view in ``PrefixIndex``: a group's chunk ``i`` is present iff the
view holds the request's block hash at token ``(i + 1) * chunk`` for that
group and tier. Chunk sizes per tier:
- ``GPU`` (vLLM's prefix cache): one engine block (``GroupSpec.block_tokens``);
  vLLM never hits the last prompt token there, even without window groups;
- offload tiers (``STORAGE``, ``CPU``): the offload chunk
  (``GroupSpec.chunk_tokens``); their hashes are the chunk keys' hashes.
The connector loads from an offload tier past the GPU hit, so a replica's
``total`` is ``GPU + max over offload tiers of servable(computed=GPU)``.

The rule is at least as strict as vLLM's GPU prefix cache (a window needs
``cdiv(W, B)`` blocks there, vLLM ``cdiv(W - 1, B)``), so the answer never
exceeds what the replica serves from what the view holds.

``pick``: most ``total`` tokens; among equals (often: nothing anywhere) the
replica whose full-attention groups hold the longest prefix in any tier
(``affinity``, promised nothing: the rest of the request is then stored next
to it instead of on a third replica), then the lowest load, then the first
replica in configured order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import msgspec

from hybridkv.groups import GroupKind, GroupSpec, HybridLayout
from hybridkv.hit_rule import servable_tokens
from hybridkv.routing.events import MEDIUM_GPU
from hybridkv.routing.index import PrefixIndex

__all__ = ["TierGroups", "tier_groups", "ReplicaScore", "score_replicas", "pick"]

#: tier (event medium) -> the layout's groups with that tier's chunk size
TierGroups = dict[str, tuple[GroupSpec, ...]]


def tier_groups(layout: HybridLayout, offload_tiers: Sequence[str] = ("STORAGE", "CPU")
                ) -> TierGroups:
    gpu = tuple(msgspec.structs.replace(g, chunk_tokens=g.block_tokens) for g in layout.groups)
    out: TierGroups = {MEDIUM_GPU: gpu}
    for tier in offload_tiers:
        out[tier] = tuple(layout.groups)
    return out


class ReplicaScore(msgspec.Struct, kw_only=True):
    replica: str
    tiers: dict[str, int]
    total: int
    affinity: int = 0
    load: float = 0.0
    note: str | None = None


def _servable(index: PrefixIndex, name: str, tier: str, groups: Sequence[GroupSpec],
              keys: Sequence[int], hash_tokens: int, num_tokens: int, computed: int) -> int:
    def present(g: int, i: int) -> bool:
        end = (i + 1) * by_index[g].chunk_tokens
        j = end // hash_tokens - 1
        return 0 <= j < len(keys) and index.holds(name, tier, g, keys[j])

    by_index = {g.index: g for g in groups}
    n = num_tokens
    if tier == MEDIUM_GPU and all(g.kind is GroupKind.FULL for g in groups):
        n -= 1  # vLLM's prefix cache leaves the last token to compute
    return servable_tokens(groups, present, n, computed) if n > 0 else 0


def _full_prefix(index: PrefixIndex, name: str, tier: str, groups: Sequence[GroupSpec],
                 keys: Sequence[int], hash_tokens: int, num_tokens: int) -> int:
    """Tokens of the longest prefix every full-attention group holds in this tier."""
    best = num_tokens
    for g in groups:
        if g.kind is not GroupKind.FULL:
            continue
        run = 0
        while True:
            j = (run + 1) * g.chunk_tokens // hash_tokens - 1
            if j >= len(keys) or not index.holds(name, tier, g.index, keys[j]):
                break
            run += 1
        best = min(best, run * g.chunk_tokens)
    return best


def score_replicas(index: PrefixIndex, groups: TierGroups, keys: Sequence[int],
                   hash_tokens: int, num_tokens: int,
                   loads: Mapping[str, float] | None = None) -> list[ReplicaScore]:
    """Per replica, per tier servable tokens for a request of ``num_tokens``.

    ``keys[j]`` is the request's block hash (int form) at token ``(j+1) * hash_tokens``.
    """
    for tier, gs in groups.items():
        for g in gs:
            if g.chunk_tokens % hash_tokens:
                raise ValueError(f"tier {tier} group {g.index}: {g.chunk_tokens}-token chunks "
                                 f"are not a multiple of the {hash_tokens}-token hash block")
    out = []
    with index.lock:
        for name in index.replicas:
            load = float((loads or {}).get(name, 0.0))
            note = index.mismatch(name)
            if note is not None:
                out.append(ReplicaScore(replica=name, tiers={t: 0 for t in groups}, total=0,
                                        load=load, note=note))
                continue
            tiers = {}
            gpu = 0
            if MEDIUM_GPU in groups:
                gpu = tiers[MEDIUM_GPU] = _servable(index, name, MEDIUM_GPU, groups[MEDIUM_GPU],
                                                    keys, hash_tokens, num_tokens, 0)
            best_ext = 0
            for tier, gs in groups.items():
                if tier == MEDIUM_GPU:
                    continue
                tiers[tier] = _servable(index, name, tier, gs, keys, hash_tokens, num_tokens, 0)
                ext = _servable(index, name, tier, gs, keys, hash_tokens, num_tokens, gpu)
                best_ext = max(best_ext, ext)
            affinity = max(_full_prefix(index, name, t, gs, keys, hash_tokens, num_tokens)
                           for t, gs in groups.items())
            out.append(ReplicaScore(replica=name, tiers=tiers, total=gpu + best_ext,
                                    affinity=affinity, load=load))
    return out


def pick(scores: Sequence[ReplicaScore]) -> ReplicaScore | None:
    """Most total tokens, then affinity, then the lowest load, then configured order."""
    best = None
    for s in scores:
        if best is None or (s.total, s.affinity, -s.load) > (best.total, best.affinity, -best.load):
            best = s
    return best
