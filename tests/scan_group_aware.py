"""TEST ORACLE: the group-aware policy as it was before it became incremental.

It recomputes every hit point, count and pool from the whole index on each decision
(``analyze``: time linear in the stored chunks).
``tests/policies/test_group_aware_incremental.py`` checks that
``hybridkv.policies.group_aware`` decides exactly as this does; the policy overhead
benchmark times it for comparison. Not part of the package.

The original module docstring follows.

hybridkv's group-aware capacity policy: spend the disk budget where hits come from.

Vocabulary: a *hit point* is a stored prefix position p where every group can
serve a hit (the first full-attention group's chain is complete from the
start to p, every other full-attention group's too, each sliding-window group
holds the window before p, each state group holds the state at p). A chunk is
*live* if some hit point needs it, *dead* otherwise (its prefix was evicted,
its window no longer ends at a hit point, its state has no prefix).

Admission: per group kind (``full``, ``sliding``, ``state`` modules), around
the request's likely hit points (``hit_points``).

A *checkpoint* is a hit point that needs no ``SPARE`` chunk (one admitted at a
likely hit point, or one a loaded hit touched). A spare chunk's *gap* is the
distance from the deepest hit point it serves to the nearest checkpoint past
it (where its request ended); a checkpoint hit since then means requests
resume past it, and the gap counts as wide.

Eviction order, when bytes are needed:
1. dead chunks, least recently used first (orphans are reclaimed here and,
   eagerly, by ``orphans_of`` when a chunk is removed);
2. *expendable* spare chunks: those with a gap wider than one chunk, widest
   gap first, then least recently used. A spare candidate may evict only
   these two kinds (``expendable`` bytes), never a hit point. (Spare
   candidates are stored deepest first, ``Capacity.plan_store``.)
3. hit points, lowest utility first: a retired hit point releases every chunk
   no remaining hit point needs (its state, window chunks no other point uses,
   and spine chunks with no hit point left at or below them, so deeper chunks
   always go before their ancestors). Utility = recency rank + ``alpha`` x
   prefill FLOPs the point saves (over the next checkpoint up its prefix) per
   byte charged to it (its share of each chunk it needs), both scaled to
   [0, 1] over the candidates (Marconi). A point's recency is when a loaded hit
   last ended there (or when it was stored). Comparing per byte across groups
   keeps one group from starving the others. A point that needs a spare chunk
   (one a chunk short of a checkpoint: a follow-up that changes only the tail
   of a prompt, such as a second question on a document, resumes there) gets
   no FLOPs credit, its reuse being a guess: it stays by recency alone.

Invariants: see ``hybridkv.policies.base``; in addition no chunk that a
servable hit point needs is evicted while a dead or spare chunk could free the
same bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from hybridkv.cost import PrefillCost
from hybridkv.groups import GroupKind, HybridLayout
from hybridkv.index import ChunkEntry, ChunkIndex
from hybridkv.keys import key_group, key_hash, make_key
from hybridkv.policies.base import Admission, Candidate, CapacityPolicy, RequestView
from hybridkv.policies.group_aware.full import FullAttentionRule
from hybridkv.policies.group_aware.resume_points import resume_points
from hybridkv.policies.lru import lru_order
from hybridkv.policies.group_aware.sliding import SlidingWindowRule
from hybridkv.policies.group_aware.state import StateRule

__all__ = ["GroupAwarePolicy", "Analysis"]

log = logging.getLogger(__name__)

#: the gap of a spare chunk with no checkpoint past it
_FAR = 1 << 62

RULES = {GroupKind.FULL: FullAttentionRule(), GroupKind.SLIDING: SlidingWindowRule(),
         GroupKind.STATE: StateRule()}


@dataclass(slots=True)
class HitPoint:
    key: bytes  # the backbone (first full-attention group) chunk ending at the point
    position: int
    needs: list[bytes]  # what other groups load for a hit here


@dataclass(slots=True)
class Analysis:
    """A snapshot of which stored chunks serve which hit points."""

    points: dict[bytes, HitPoint]
    live: set[bytes]
    dead: list[bytes]  # least recently used first
    spare: list[bytes]  # expendable spare chunks: widest gap first, then least recently used
    order: list[HitPoint]  # lowest utility first
    refs: dict[bytes, int]  # non-spine chunk -> hit points that need it
    below: dict[bytes, int]  # spine chunk -> hit points at or below it


class GroupAwarePolicy(CapacityPolicy):
    name = "group_aware"
    reclaims_orphans = True

    def __init__(self, layout: HybridLayout, *, cost: PrefillCost | None = None,
                 checkpoint_interval: int = 0, alpha: float = 1.0):
        full = layout.groups_of(GroupKind.FULL)
        if not full:
            raise ValueError("the group-aware policy needs a full-attention group")
        self.layout = layout
        self.backbone = full[0]
        self.others = [g for g in layout.groups if g.index != self.backbone.index]
        self.cost = cost or PrefillCost.from_layout(layout)
        self.checkpoint_interval = checkpoint_interval
        self.alpha = alpha
        self._groups = {g.index: g for g in layout.groups}
        self.spine_groups = frozenset(g.index for g in full)

    # ------------------------------------------------------------------ admission
    def admit(self, batch: Sequence[Candidate], request: RequestView,
              index: ChunkIndex) -> list[Admission]:
        points = resume_points(self.backbone, request, index, self.checkpoint_interval)
        grid = self.backbone.chunk_tokens
        out = []
        for cand in batch:
            group = self._groups[cand.group]
            out.append(RULES[group.kind].admit(group, cand, points, grid))
        return out

    def on_load(self, keys: Sequence[bytes], index: ChunkIndex) -> None:
        super().on_load(keys, index)
        spine = [e for k in keys if (e := index.get(k)) is not None and e.group == self.backbone.index]
        if spine:
            index.mark_hit(max(spine, key=lambda e: e.position).key)

    # ------------------------------------------------------------------ eviction
    def victims(self, index: ChunkIndex, needed: int, protect: Collection[bytes] = (), *,
                expendable: int = 0) -> list[bytes]:
        a = self.analyze(index)
        chosen: list[bytes] = []
        taken: set[bytes] = set()
        freed = 0

        def take(key: bytes) -> None:
            nonlocal freed
            entry = index.get(key)
            if key in taken or entry is None or entry.pins or key in protect:
                return
            taken.add(key)
            chosen.append(key)
            freed += entry.size

        for key in a.dead + a.spare:
            if freed >= needed + expendable:
                return chosen
            take(key)
        # retire hit points, lowest utility first; a chunk goes once no remaining point needs it
        refs, below = a.refs, a.below
        for pt in a.order:
            if freed >= needed:
                return chosen
            for k in pt.needs:
                refs[k] -= 1
                if refs[k] == 0 and self._groups[key_group(k)].kind is not GroupKind.FULL:
                    take(k)
            k: bytes | None = pt.key
            while k is not None and (entry := index.get_any(k)) is not None:
                below[k] -= 1
                if below[k] == 0:
                    take(k)
                    for other in index.companions(k).values():
                        if refs.get(other, 0) <= 0:
                            take(other)
                k = entry.parent
        if freed < needed:  # only pinned / protected chunks are left: plain LRU
            for key in lru_order(index, needed - freed, set(protect) | taken):
                take(key)
        return chosen

    def orphans_of(self, index: ChunkIndex, key: bytes) -> list[bytes]:
        """Stored chunks that cannot be part of any hit once ``key`` is gone."""
        group = self._groups.get(key_group(key))
        if group is None or group.kind is not GroupKind.FULL:
            return []
        deeper = [key, *index.descendants(key)]
        out = []
        for k in deeper:
            for other in index.companions(k).values():
                if other != key:
                    out.append(other)
                    if self._groups[key_group(other)].kind is not GroupKind.FULL:
                        continue
                    out += index.descendants(other)
        return list(dict.fromkeys(out))

    # ------------------------------------------------------------------ analysis
    def analyze(self, index: ChunkIndex) -> Analysis:
        bb = self.backbone
        memo: dict[int, dict[bytes, bool]] = {g.index: {} for g in self.layout.groups}
        points: dict[bytes, HitPoint] = {}
        spine = [e for e in (*index, *index.pending()) if e.group == bb.index]
        for entry in spine:
            if not FullAttentionRule.rooted(index, entry.key, bb, memo[bb.index]):
                continue
            needs = self._needs(index, entry.key, entry.position, memo)
            if needs is not None:
                points[entry.key] = HitPoint(entry.key, entry.position, needs)

        live: set[bytes] = set()
        refs: dict[bytes, int] = {}
        firm: set[bytes] = set()  # checkpoints: hit points that need no spare chunk
        for pt in points.values():
            self._mark_chain(index, pt.key, live)
            if not any((e := index.get_any(k)) is not None and e.spare for k in pt.needs):
                firm.add(pt.key)
            for k in pt.needs:
                refs[k] = refs.get(k, 0) + 1
                if self._groups[key_group(k)].kind is GroupKind.FULL:
                    self._mark_chain(index, k, live)
                else:
                    live.add(k)

        # hit points at or below each backbone chunk, and the nearest checkpoint there
        below: dict[bytes, int] = {}
        checkpoint: dict[bytes, ChunkEntry] = {}
        for entry in sorted(spine, key=lambda e: -e.position):
            n = below.get(entry.key, 0) + (entry.key in points)
            below[entry.key] = n
            if entry.key in firm:
                checkpoint[entry.key] = entry
            if entry.parent is not None:
                below[entry.parent] = below.get(entry.parent, 0) + n
                cp, up = checkpoint.get(entry.key), checkpoint.get(entry.parent)
                if cp is not None and (up is None or cp.position < up.position):
                    checkpoint[entry.parent] = cp

        # each spare chunk's gap (module docstring): from its hit points (none of them a
        # checkpoint) to their checkpoint
        gap: dict[bytes, int] = {}
        for pt in points.values():
            if pt.key in firm:
                continue
            cp = checkpoint.get(pt.key)
            d = _FAR
            if cp is not None and cp.last_hit <= index.get_any(pt.key).created:
                d = cp.position - pt.position
            for k in pt.needs:
                gap[k] = min(d, gap.get(k, _FAR))

        stored = sorted(index, key=lambda e: e.last_access)
        dead = [e.key for e in stored if e.key not in live]
        # a spare chunk within a chunk of a checkpoint is not expendable: it goes with
        # its hit point, by utility
        near = bb.chunk_tokens
        spare = sorted((e.key for e in stored if e.key in live and e.spare
                        and gap.get(e.key, _FAR) > near),
                       key=lambda k: -gap.get(k, _FAR))
        return Analysis(points=points, live=live, dead=dead, spare=spare,
                        order=self._utility_order(index, points, refs, below, firm),
                        refs=refs, below=below)

    def _utility_order(self, index: ChunkIndex, points: dict[bytes, HitPoint],
                       refs: dict[bytes, int], below: dict[bytes, int],
                       firm: set[bytes]) -> list[HitPoint]:
        """Hit points, lowest utility first (recency rank + alpha x FLOPs per byte)."""
        if not points:
            return []
        pts = list(points.values())
        recency, density = [], []
        for pt in pts:
            at = index.get_any(pt.key)
            recency.append((max(at.last_hit, at.created), pt.position))
            if pt.key not in firm:  # it needs a spare chunk: it saves FLOPs only by chance
                density.append(0.0)
                continue
            # bytes this point is charged: its share of every chunk it needs, and of the
            # spine chunks up to the next checkpoint up its prefix (the base it saves over)
            size = sum(e.size / refs[k] for k in pt.needs if (e := index.get_any(k)))
            base = 0
            size += at.size / max(1, below.get(pt.key, 1))
            up = at.parent
            while up is not None and (e := index.get_any(up)) is not None:
                if up in firm:
                    base = e.position
                    break
                size += e.size / max(1, below.get(up, 1))
                up = e.parent
            value = self.cost.prefill_flops(pt.position) - self.cost.prefill_flops(base)
            density.append(value / max(1.0, size))
        order = sorted(range(len(pts)), key=recency.__getitem__)
        rank = [0.0] * len(pts)
        for r, i in enumerate(order):
            rank[i] = r / max(1, len(pts) - 1)
        top = max(density) or 1.0
        score = [rank[i] + self.alpha * density[i] / top for i in range(len(pts))]
        # ties (equal utility): the less recently used point first
        return [pts[i] for i in sorted(range(len(pts)), key=lambda i: (score[i], rank[i]))]

    def _needs(self, index: ChunkIndex, key: bytes, position: int,
               memo: dict[int, dict[bytes, bool]]) -> list[bytes] | None:
        h = key_hash(key)
        needs: list[bytes] = []
        for g in self.others:
            k = make_key(h, g.index)
            if g.kind is GroupKind.FULL:
                if not FullAttentionRule.rooted(index, k, g, memo[g.index]):
                    return None
                needs.append(k)
                continue
            got = RULES[g.kind].needs(index, g, k, position)
            if got is None:
                return None
            needs += got
        return needs

    @staticmethod
    def _mark_chain(index: ChunkIndex, key: bytes, live: set[bytes]) -> None:
        k: bytes | None = key
        while k is not None and k not in live and (entry := index.get_any(k)) is not None:
            live.add(k)
            k = entry.parent
