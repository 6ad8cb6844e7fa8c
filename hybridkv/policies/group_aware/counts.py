"""Counts that make a chunk live: how many hit points need it.

- ``refs``: slot of a non-spine chunk -> hit points whose ``needs`` hold it;
- ``needed_by``: the same chunks -> the set of those hit points;
- ``points_below``: full-attention slot -> hit points whose chain runs through it
  (spine chunks: the points at or below it; other full-attention groups: the needs
  at or below it).

A chunk is *live* exactly when its count is > 0 (``points_below`` for a
full-attention chunk, ``refs`` otherwise); a stored chunk that is not live is in
the dead pool.

Invariant (after every index change): the counts equal what a scan of all hit
points computes, and a key is present only with a count > 0.
"""

from __future__ import annotations

from hybridkv.index import STORED, ChunkIndex, IndexColumns
from hybridkv.policies.group_aware.point import SHARED, Point

__all__ = ["Counts"]


class Counts:
    """Mixin of ``HitPointTracker``: ``refs``, ``needed_by``, ``points_below``."""

    index: ChunkIndex
    columns: IndexColumns
    refs: dict[int, int]
    needed_by: dict[int, set[int]]
    points_below: dict[int, int]
    _full: set[int]
    _stale: set[int]

    def is_live(self, slot: int) -> bool:
        """Does some hit point need the chunk at ``slot``?"""
        if self.columns.group[slot] in self._full:
            return self.points_below.get(slot, 0) > 0
        return self.refs.get(slot, 0) > 0

    def _count_up(self, pt: Point, b: int, delta: int) -> None:
        """Hit point ``b`` appears (+1) or goes (-1): points below, on every chain it uses."""
        self._chain_add(b, delta)
        group = self.columns.group
        for n in pt.needs:
            if group[n] in self._full:
                self._chain_add(n, delta)

    def _chain_add(self, slot: int, delta: int) -> None:
        cols = self.columns
        parent, flags = cols.parent, cols.flags
        points_below = self.points_below
        s = slot
        while s != -1:
            before = points_below.get(s, 0)
            after = before + delta
            if after:
                points_below[s] = after
            else:
                points_below.pop(s, None)
            if (before == 0) != (after == 0) and flags[s] & STORED:
                if after:
                    self._dead_drop(s)
                else:
                    self._dead_add(s)
            s = parent[s]

    def _ref(self, slot: int, delta: int) -> None:
        cols = self.columns
        before = self.refs.get(slot, 0)
        after = before + delta
        if after:
            self.refs[slot] = after
        else:
            self.refs.pop(slot, None)
        users = self.needed_by.get(slot, ())
        if len(users) < SHARED:  # a widely shared chunk: each share moves by < 1/SHARED
            self._stale.update(users)
        if cols.group[slot] in self._full:
            return  # liveness of a full-attention chunk follows ``points_below``
        if (before == 0) != (after == 0) and cols.flags[slot] & STORED:
            if after:
                self._dead_drop(slot)
            else:
                self._dead_add(slot)
