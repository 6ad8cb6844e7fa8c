"""Values of hit points that depend on wider structure, refreshed lazily.

- *density* (checkpoints): FLOPs the point saves over the checkpoint above it,
  per byte charged to it (a share of each chunk it needs, and of each spine chunk
  from it up to that checkpoint, split among the points below that chunk);
- *gap* (non-checkpoints): the distance to the shallowest checkpoint below it (FAR:
  none, or one hit since the point was stored), and per chunk the smallest gap of
  the non-checkpoints that need it (``_smallest_gap``: [gap, how many have it]),
  which orders the spare pool.

A change marks the points whose values it may move *stale* (``_stale_up``,
``_stale_chain``, ``_stale_reaching``); the tracker's ``settle`` recomputes them.

Invariant: at every decision densities, gaps and the spare pool equal what a scan
computes, unless a bound was reached (``point.SHARED``, ``point.WALK_LIMIT``).
"""

from __future__ import annotations

from hybridkv.cost import PrefillCost
from hybridkv.index import ChunkIndex, IndexColumns
from hybridkv.policies.group_aware.point import FAR, SHARED, WALK_LIMIT, Point

__all__ = ["LazyValues"]


class LazyValues:
    """Mixin of ``HitPointTracker``: marking points stale, density, gap."""

    index: ChunkIndex
    columns: IndexColumns
    cost: PrefillCost
    points: dict[int, Point]
    refs: dict[int, int]
    needed_by: dict[int, set[int]]
    points_below: dict[int, int]
    _stale: set[int]
    _smallest_gap: dict[int, list[int]]

    # ------------------------------------------------------------------ marking stale
    def _stale_up(self, b: int) -> None:
        """A checkpoint at ``b`` changed: points above it (up to a checkpoint) are stale."""
        parent = self.columns.parent
        s = parent[b]
        while s != -1:
            pt = self.points.get(s)
            if pt is not None:
                self._stale.add(s)
                if pt.checkpoint:
                    break
            s = parent[s]
        # the points below whose density stops at b
        budget = WALK_LIMIT
        for c in self.index.child_slots(b):
            stack = [c]
            while stack and budget > 0:
                budget -= 1
                s = stack.pop()
                pt = self.points.get(s)
                if pt is not None:
                    self._stale.add(s)
                    if pt.checkpoint:
                        continue
                stack.extend(self.index.child_slots(s))

    def _stale_chain(self, b: int) -> None:
        """A point at ``b`` came or went: ``points_below`` changed on its whole chain.

        A point's density charges it a share of each chunk from itself up to (not
        including) the checkpoint above it, so the points to refresh are, for each
        chunk of the chain, those that reach it going up without meeting a checkpoint.
        """
        parent = self.columns.parent
        seen: set[int] = set()
        s = b
        while s != -1:
            self._stale_reaching(s, seen)
            s = parent[s]

    def _stale_reaching(self, s: int, seen: set[int]) -> None:
        """Mark the points whose density charges them a share of chunk ``s``."""
        ix = self.index
        points = self.points
        seen.add(s)
        pt = points.get(s)
        if pt is not None:
            self._stale.add(s)
        if (pt is not None and pt.checkpoint) or self.points_below.get(s, 0) >= SHARED:
            return
        stack = [c for c in ix.child_slots(s) if c not in seen]
        budget = WALK_LIMIT
        while stack and budget > 0:
            budget -= 1
            c = stack.pop()
            seen.add(c)
            under = points.get(c)
            if under is not None:
                self._stale.add(c)
                if under.checkpoint:
                    continue
            stack.extend(x for x in ix.child_slots(c) if x not in seen)

    # ------------------------------------------------------------------ values
    def _density(self, b: int, pt: Point) -> float:
        """FLOPs the point saves over the checkpoint above it, per byte charged to it."""
        cols = self.columns
        size_of, parent, position = cols.size, cols.parent, cols.position
        points_below = self.points_below
        size = 0.0
        for n in pt.needs:
            size += size_of[n] / self.refs[n]
        size += size_of[b] / max(1, points_below.get(b, 1))
        base = 0
        up = parent[b]
        while up != -1:
            above = self.points.get(up)
            if above is not None and above.checkpoint:
                base = position[up]
                break
            size += size_of[up] / max(1, points_below.get(up, 1))
            up = parent[up]
        value = self.cost.prefill_flops(position[b]) - self.cost.prefill_flops(base)
        return value / max(1.0, size)

    def _gap(self, b: int) -> int:
        """From a non-checkpoint to the shallowest checkpoint below it (FAR: none, or hit since)."""
        ix, cols = self.index, self.columns
        position, points = cols.position, self.points
        best, best_pos = -1, FAR
        level = list(ix.child_slots(b))
        budget = WALK_LIMIT
        while level and best == -1 and budget > 0:  # level by level: shallowest first
            nxt = []
            for s in level:
                budget -= 1
                pt = points.get(s)
                if pt is not None and pt.checkpoint:
                    if position[s] < best_pos:
                        best, best_pos = s, position[s]
                    continue
                nxt.extend(ix.child_slots(s))
            level = nxt
        if best == -1 or cols.last_hit.get(best, 0) > cols.created[b]:
            return FAR
        return best_pos - position[b]

    def _gap_in(self, slot: int, gap: int) -> None:
        """A non-checkpoint needing ``slot`` counts with ``gap``: keep the minimum."""
        cur = self._smallest_gap.get(slot)
        if cur is None or gap < cur[0]:
            self._smallest_gap[slot] = [gap, 1]
            self._spare_sync(slot)
        elif gap == cur[0]:
            cur[1] += 1

    def _gap_out(self, slot: int, gap: int) -> None:
        """A non-checkpoint with ``gap`` stops counting for ``slot``."""
        cur = self._smallest_gap.get(slot)
        if cur is None or gap != cur[0]:
            return
        cur[1] -= 1
        if cur[1] > 0:
            return
        best, count = FAR, 0
        points = self.points
        for b in self.needed_by.get(slot, ()):
            pt = points[b]
            if pt.gap_counted and not pt.checkpoint:
                if pt.gap < best:
                    best, count = pt.gap, 1
                elif pt.gap == best:
                    count += 1
        if count:
            self._smallest_gap[slot] = [best, count]
        else:
            del self._smallest_gap[slot]
        self._spare_sync(slot)
