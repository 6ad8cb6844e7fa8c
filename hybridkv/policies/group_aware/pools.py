"""The two pools eviction empties before it retires any hit point.

- ``dead``: ``(last_access, slot)`` of every stored chunk that is not live, least
  recently used first;
- ``spare``: ``(-gap, last_access, slot)`` of every *expendable* spare chunk: stored,
  ``SPARE``, live, and whose smallest gap (over the non-checkpoints that need it and
  count their gap) is wider than one spine chunk; widest gap first, then least
  recently used. A chunk no non-checkpoint counts has gap FAR.

Each pool keeps a slot -> entry dict beside its sorted list, so a chunk enters or
leaves in O(log N). Invariant: ``dead`` is exact after every change; ``spare`` at
every decision (its gaps are lazy values, see ``lazy_values``).
"""

from __future__ import annotations

from sortedcontainers import SortedList

from hybridkv.index import SPARE, STORED, ChunkIndex, IndexColumns
from hybridkv.policies.group_aware.point import FAR

__all__ = ["Pools"]


class Pools:
    """Mixin of ``HitPointTracker``: the ``dead`` and ``spare`` pools."""

    index: ChunkIndex
    columns: IndexColumns
    spine_chunk: int
    dead: SortedList
    spare: SortedList
    _dead_key: dict[int, tuple[int, int]]
    _spare_key: dict[int, tuple[int, int, int]]
    _smallest_gap: dict[int, list[int]]

    def _dead_add(self, slot: int) -> None:
        self._dead_drop(slot)
        key = (self.columns.last_access[slot], slot)
        self._dead_key[slot] = key
        self.dead.add(key)

    def _dead_drop(self, slot: int) -> None:
        key = self._dead_key.pop(slot, None)
        if key is not None:
            self.dead.discard(key)

    def _spare_sync(self, slot: int) -> None:
        """Put ``slot`` in the spare pool with its current gap, or out of it."""
        cols = self.columns
        flags = cols.flags[slot]
        smallest = self._smallest_gap.get(slot)
        gap = FAR if smallest is None else smallest[0]
        if (not flags & STORED or not flags & SPARE or gap <= self.spine_chunk
                or not self.is_live(slot)):
            self._spare_drop(slot)
            return
        key = (-gap, cols.last_access[slot], slot)
        old = self._spare_key.get(slot)
        if old == key:
            return
        if old is not None:
            self.spare.discard(old)
        self._spare_key[slot] = key
        self.spare.add(key)

    def _spare_drop(self, slot: int) -> None:
        key = self._spare_key.pop(slot, None)
        if key is not None:
            self.spare.discard(key)
