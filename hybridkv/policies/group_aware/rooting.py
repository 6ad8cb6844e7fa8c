"""Rootedness: which full-attention chunks have their whole chain back to the prefix start.

A full-attention chunk is *rooted* when it is the first chunk of its prefix (it
ends within one chunk) or its parent is present and rooted. Only a rooted spine
chunk can be a hit point, and a hit point needs the other full-attention groups'
chunks at its position rooted too.

Invariant (after every index change): ``rooted`` holds exactly the present
(stored or pending) rooted full-attention slots. An arrival roots its subtree
(``_root_down``); a departure unroots its subtree (``_subtree``, in the tracker).
"""

from __future__ import annotations

from collections.abc import Iterator

from hybridkv.groups import GroupSpec
from hybridkv.index import ChunkIndex, IndexColumns

__all__ = ["Rooting"]


class Rooting:
    """Mixin of ``HitPointTracker``: the ``rooted`` set."""

    index: ChunkIndex
    columns: IndexColumns
    rooted: set[int]
    _spec: dict[int, GroupSpec]

    def _root_one(self, slot: int) -> bool:
        """Root ``slot`` if its chain reaches the start; whether it is rooted now."""
        cols = self.columns
        g = self._spec[cols.group[slot]]
        p = cols.parent[slot]
        if cols.position[slot] <= g.chunk_tokens or (p != -1 and p in self.rooted):
            self.rooted.add(slot)
            return True
        return False

    def _root_down(self, slot: int) -> None:
        """``slot`` became rooted: so does every present chunk below it."""
        stack = list(self.index.child_slots(slot))
        while stack:
            s = stack.pop()
            if s in self.rooted:
                continue
            self.rooted.add(s)
            self._recheck_around(s)
            stack.extend(self.index.child_slots(s))

    def _subtree(self, slot: int) -> Iterator[int]:
        """Every present chunk below ``slot``."""
        stack = list(self.index.child_slots(slot))
        while stack:
            s = stack.pop()
            yield s
            stack.extend(self.index.child_slots(s))
