"""What a hit at a spine chunk needs from the other groups, and which points a chunk touches.

``_needs(b)``: for the spine slot ``b``, the slots other groups load for a hit at
its position (another full-attention group: its chunk there, rooted; a sliding
group: the chunks covering the window before it, deepest first; a state group:
its state there), or None when one is missing. The neighbourhood of a chunk
(``_recheck_around``) is every spine slot whose needs may change when it comes
or goes: the spine chunk at its position, the points whose sliding window may
include it, and the points that need it.

Invariant: ``_needs`` reads only present slots; a sliding window is followed up
at most ``load_window_chunks`` chunks and stops at the prefix start.
"""

from __future__ import annotations

from hybridkv.groups import GroupKind, GroupSpec
from hybridkv.hit_rule import load_window_chunks
from hybridkv.index import ChunkIndex, IndexColumns
from hybridkv.keys import key_hash

__all__ = ["Needs", "max_window_chunks"]


class Needs:
    """Mixin of ``HitPointTracker``: needs of a hit point, neighbourhood of a chunk."""

    index: ChunkIndex
    columns: IndexColumns
    rooted: set[int]
    needed_by: dict[int, set[int]]
    spine_group: int
    _other_keys: list[tuple[GroupSpec, bytes, GroupKind]]
    _window_n: dict[tuple[int, int], int]
    _spine_suffix: bytes
    _reach: dict[int, int]
    _recheck: set[int]

    def _needs(self, b: int) -> tuple[int, ...] | None:
        cols = self.columns
        h = key_hash(cols.keys[b])  # type: ignore[arg-type]
        position = cols.position[b]
        needs: list[int] = []
        slot_of = cols.slot_of
        for g, suffix, kind in self._other_keys:
            s = slot_of(h + suffix)
            if s is None:
                return None
            if kind is GroupKind.FULL:
                if s not in self.rooted:
                    return None
                needs.append(s)
            elif kind is GroupKind.SLIDING:
                cur = s
                c = g.chunk_tokens
                n = self._window_n.get((g.index, position % c))
                if n is None:
                    n = self._window_n[(g.index, position % c)] = load_window_chunks(g, position) or 1
                for _ in range(n):
                    if cur == -1:
                        return None
                    needs.append(cur)
                    if cols.position[cur] <= g.chunk_tokens:
                        break
                    cur = cols.parent[cur]
            else:
                needs.append(s)
        return tuple(needs)

    def _spine_at(self, slot: int) -> int | None:
        """The spine slot at ``slot``'s prefix position (None: not present)."""
        cols = self.columns
        if cols.group[slot] == self.spine_group:
            return slot
        return cols.slot_of(key_hash(cols.keys[slot]) + self._spine_suffix)  # type: ignore[arg-type]

    def _window_points(self, slot: int) -> set[int]:
        """Spine slots whose window in ``slot``'s (sliding) group may include it."""
        out: set[int] = set()
        depth = self._reach[self.columns.group[slot]]
        level = [slot]
        for _ in range(depth):
            nxt = []
            for s in level:
                b = self._spine_at(s)
                if b is not None:
                    out.add(b)
                nxt.extend(self.index.child_slots(s))
            level = nxt
            if not level:
                break
        return out

    def _recheck_around(self, slot: int) -> None:
        """The hit points whose needs ``slot`` may change are recomputed at the next settle."""
        b = self._spine_at(slot)
        if b is not None:
            self._recheck.add(b)
        if self.columns.group[slot] in self._reach:
            self._recheck.update(self._window_points(slot))
        self._recheck.update(self.needed_by.get(slot, ()))


def max_window_chunks(group: GroupSpec) -> int:
    """How many chunks below a chunk of ``group`` a window that includes it can end (>= 1)."""
    c = group.chunk_tokens
    return max(load_window_chunks(group, c * 4 + r) or 1 for r in range(c))
