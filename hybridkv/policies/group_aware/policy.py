"""hybridkv's group-aware capacity policy: spend the disk budget where hits come from.

Vocabulary: a *hit point* is a stored prefix position p where every group can
serve a hit (the first full-attention group's chain is complete from the
start to p, every other full-attention group's too, each sliding-window group
holds the window before p, each state group holds the state at p). A chunk is
*live* if some hit point needs it, *dead* otherwise (its prefix was evicted,
its window no longer ends at a hit point, its state has no prefix).

Admission: per group kind (``full``, ``sliding``, ``state`` modules), around
the request's *resume points*, where a later request is likely to resume
(``resume_points``).

The *spine* is the first full-attention group: a hit point is identified by its
spine chunk, and its chain is the spine chunks from the prefix start to it.

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

The state behind these decisions (hit points, reference counts, the pools and
the two sorted lists of the utility order) is kept up to date as chunks come
and go (``tracker.HitPointTracker``, a listener of the index), so one decision costs
time in the chunks it evicts, not in the chunks stored (``order``).

Invariants: see ``hybridkv.policies.base``; in addition no chunk that a
servable hit point needs is evicted while a dead or spare chunk could free the
same bytes.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from hybridkv.cost import PrefillCost
from hybridkv.groups import GroupKind, HybridLayout
from hybridkv.index import STORED, ChunkIndex
from hybridkv.keys import key_group, key_hash, make_key
from hybridkv.policies.base import Admission, Candidate, CapacityPolicy, RequestView
from hybridkv.policies.group_aware.full import FullAttentionRule
from hybridkv.policies.group_aware.resume_points import resume_points
from hybridkv.policies.group_aware.order import utility_order
from hybridkv.policies.group_aware.sliding import SlidingWindowRule
from hybridkv.policies.group_aware.state import StateRule
from hybridkv.policies.group_aware.tracker import HitPointTracker
from hybridkv.policies.lru import lru_order

__all__ = ["GroupAwarePolicy"]

RULES = {GroupKind.FULL: FullAttentionRule(), GroupKind.SLIDING: SlidingWindowRule(),
         GroupKind.STATE: StateRule()}


class GroupAwarePolicy(CapacityPolicy):
    name = "group_aware"

    def __init__(self, layout: HybridLayout, *, cost: PrefillCost | None = None,
                 checkpoint_interval: int = 0, alpha: float = 1.0):
        full = layout.groups_of(GroupKind.FULL)
        if not full:
            raise ValueError("the group-aware policy needs a full-attention group")
        self.layout = layout
        #: the spine: the first full-attention group (hit points are its chunks)
        self.spine = full[0]
        self.cost = cost or PrefillCost.from_layout(layout)
        self.checkpoint_interval = checkpoint_interval
        self.alpha = alpha
        self._groups = {g.index: g for g in layout.groups}
        self.spine_groups = frozenset(g.index for g in full)
        self._tracker: HitPointTracker | None = None

    # ------------------------------------------------------------------ state
    def attach(self, index: ChunkIndex) -> None:
        """Decide over ``index``; its hit points are built at the first decision.

        Building them reads every chunk once (O(N), ~10-20 us per chunk), so an engine
        restarting on a large directory is ready before it; lookups, loads and stores do
        not need them.
        """
        if self._tracker is not None and self._tracker.index is not index:
            self._tracker.index.unsubscribe(self._tracker)
            self._tracker = None

    def tracker(self, index: ChunkIndex) -> HitPointTracker:
        """The incrementally kept hit points of ``index`` (built on first use)."""
        if self._tracker is None or self._tracker.index is not index:
            self.attach(index)
            self._tracker = HitPointTracker(index, self.layout, self.spine, self.cost)
        return self._tracker

    # ------------------------------------------------------------------ admission
    def admit(self, batch: Sequence[Candidate], request: RequestView,
              index: ChunkIndex) -> list[Admission]:
        points = resume_points(self.spine, request, index, self.checkpoint_interval)
        grid = self.spine.chunk_tokens
        out = []
        for cand in batch:
            group = self._groups[cand.group]
            out.append(RULES[group.kind].admit(group, cand, points, grid))
        return out

    def on_load(self, keys: Sequence[bytes], index: ChunkIndex) -> None:
        super().on_load(keys, index)
        deepest, at = None, -1
        for k in keys:
            entry = index.get(k)
            if entry is not None and entry.group == self.spine.index and entry.position > at:
                deepest, at = k, entry.position
        if deepest is not None:
            index.mark_hit(deepest)

    # ------------------------------------------------------------------ eviction
    def victims(self, index: ChunkIndex, needed: int, protect: Collection[bytes] = (), *,
                expendable: int = 0) -> list[bytes]:
        hp = self.tracker(index)
        hp.settle()
        cols = index.columns
        keys, flags, pins, size = cols.keys, cols.flags, cols.pins, cols.size
        chosen: list[bytes] = []
        taken: set[int] = set()
        freed = 0

        def take(slot: int) -> None:
            nonlocal freed
            if slot in taken or not flags[slot] & STORED or slot in pins or keys[slot] in protect:
                return
            taken.add(slot)
            chosen.append(keys[slot])  # type: ignore[arg-type]
            freed += size[slot]

        for pool in (hp.dead, hp.spare):
            for item in pool:
                if freed >= needed + expendable:
                    return chosen
                take(item[-1])
        # retire hit points, lowest utility first; a chunk goes once no remaining point needs it
        refs, points_below, points = hp.refs, hp.points_below, hp.points
        parent, group_of, full = cols.parent, cols.group, self.spine_groups
        #: per chunk, how many of its refs / points below the retired points took
        retired_refs: dict[int, int] = {}
        retired_below: dict[int, int] = {}
        for b in utility_order(hp, self.alpha):
            if freed >= needed:
                return chosen
            for n in points[b].needs:
                d = retired_refs.get(n, 0) + 1
                retired_refs[n] = d
                if refs[n] == d and group_of[n] not in full:
                    take(n)
            s = b
            while s != -1:
                d = retired_below.get(s, 0) + 1
                retired_below[s] = d
                if points_below.get(s, 0) == d:
                    take(s)
                    for other in self._companions(index, s):
                        if refs.get(other, 0) - retired_refs.get(other, 0) <= 0:
                            take(other)
                s = parent[s]
        if freed < needed:  # only pinned / protected chunks are left: plain LRU
            for key in lru_order(index, needed - freed,
                                 set(protect) | {keys[s] for s in taken}):
                slot = index.slot_of(key)
                if slot is not None:
                    take(slot)
        return chosen

    def _companions(self, index: ChunkIndex, slot: int) -> list[int]:
        """Stored slots of every group at ``slot``'s prefix position."""
        cols = index.columns
        h = key_hash(cols.keys[slot])  # type: ignore[arg-type]
        slot_of, flags = cols.slot_of, cols.flags
        out = []
        for g in self._groups:
            s = slot_of(make_key(h, g))
            if s is not None and flags[s] & STORED:
                out.append(s)
        return out

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
