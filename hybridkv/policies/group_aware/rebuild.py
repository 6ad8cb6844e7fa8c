"""The tracker's state computed from scratch, in O(N) passes over the index.

Used at start (the first decision over an index) and after ``clear``: the same
values the incremental upkeep keeps, computed as the scan-based analysis did, in
passes over the present chunks by position (parents before children, or children
first); the incremental path takes over from there.

Invariant: after ``rebuild`` every structure of the tracker, lazy values included,
equals what the incremental upkeep holds after ``settle(full=True)`` on the same
index (``tests/policies/test_group_aware_incremental.py``).
"""

from __future__ import annotations

from hybridkv.index import SPARE, STORED
from hybridkv.policies.group_aware.point import FAR, Point

__all__ = ["Rebuild"]


class Rebuild:
    """Mixin of ``HitPointTracker``: ``rebuild`` (it resets and refills every structure
    the other parts keep, and fetches ``columns`` again: after ``clear`` they are new)."""

    def _clear_all(self) -> None:
        for part in (self.rooted, self.points, self.refs, self.points_below, self.needed_by,
                     self.dead, self._dead_key, self.spare, self._spare_key, self.by_recency,
                     self.by_density, self._smallest_gap, self._stale, self._recheck,
                     self._arrived, self._touched, self._unspared, self._hits):
            part.clear()

    def rebuild(self) -> None:
        """Recompute everything from the index (at start, or after ``clear``) in O(N)."""
        self._clear_all()
        self.columns = cols = self.index.columns
        position, parent, group_of, flags = cols.position, cols.parent, cols.group, cols.flags
        present = sorted(self.index.present_slots(), key=position.__getitem__)
        full, spine, rooted = self._full, self.spine_group, self.rooted
        for s in present:  # parents first
            if group_of[s] in full:
                p = parent[s]
                if position[s] <= self._spec[group_of[s]].chunk_tokens or (
                        p != -1 and p in rooted):
                    rooted.add(s)
        # hit points and what they need
        points = self.points
        for s in present:
            if group_of[s] == spine and s in rooted:
                needs = self._needs(s)
                if needs is not None:
                    points[s] = Point(needs=needs,
                                      checkpoint=not any(flags[n] & SPARE for n in needs))
        refs, points_below, needed_by = self.refs, self.points_below, self.needed_by
        for b, pt in points.items():
            points_below[b] = points_below.get(b, 0) + 1
            for n in pt.needs:
                refs[n] = refs.get(n, 0) + 1
                needed_by.setdefault(n, set()).add(b)
                if group_of[n] in full:
                    points_below[n] = points_below.get(n, 0) + 1
        for s in reversed(present):  # children first: counts flow up each chain
            c = points_below.get(s)
            p = parent[s]
            if c and p != -1:
                points_below[p] = points_below.get(p, 0) + c
        # shallowest checkpoint at or below each spine chunk, for the gaps
        nearest_checkpoint: dict[int, int] = {}
        for s in reversed(present):
            if group_of[s] != spine:
                continue
            pt = points.get(s)
            if pt is not None and pt.checkpoint:
                nearest_checkpoint[s] = s
            cp = nearest_checkpoint.get(s)
            p = parent[s]
            if cp is not None and p != -1:
                up = nearest_checkpoint.get(p)
                if up is None or position[cp] < position[up]:
                    nearest_checkpoint[p] = cp
        last_hit, created = cols.last_hit, cols.created
        for b, pt in points.items():
            pt.recency = (max(last_hit.get(b, 0), created[b]), position[b], b)
            if pt.checkpoint:
                continue
            cp = nearest_checkpoint.get(b)
            pt.gap = FAR if cp is None or last_hit.get(cp, 0) > created[b] else \
                position[cp] - position[b]
            pt.gap_counted = True
            for n in pt.needs:
                self._gap_in(n, pt.gap)
        for b, pt in points.items():
            if pt.checkpoint:
                pt.density = self._density(b, pt)
        self.by_recency.update(pt.recency for pt in points.values())
        self.by_density.update((pt.density, b) for b, pt in points.items())
        access = cols.last_access
        dead = []
        for s in present:
            if flags[s] & STORED and not self.is_live(s):
                key = (access[s], s)
                self._dead_key[s] = key
                dead.append(key)
        self.dead.update(dead)
        for s in list(self._smallest_gap):
            self._spare_sync(s)
        for s in present:  # spare chunks no non-checkpoint counts (none need them: FAR)
            if flags[s] & SPARE and s not in self._smallest_gap:
                self._spare_sync(s)
