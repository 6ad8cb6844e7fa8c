"""Hit points kept up to date as chunks come and go (no scan of the index per decision).

``HitPoints`` listens to a ``ChunkIndex`` and maintains, for the chunks it
holds (stored or pending):

- ``rooted``: a full-attention chunk whose chain reaches the prefix start;
- ``points``: backbone slot -> ``Point`` (what other groups load for a hit
  there, and whether it is a *checkpoint*: it needs no spare chunk);
- ``refs``: non-backbone slot -> hit points that need it; ``below``:
  full-attention slot -> hit points (backbone) or needs (other full groups) at
  or below it, so a chunk is *live* exactly when one of them is > 0;
- three ordered pools over stored chunks: ``dead`` (not live; least recently used
  first), ``spare`` (live spare chunks more than a chunk short of their
  checkpoint; widest gap first, then least recently used) and the hit points by
  recency and by FLOPs per byte (``hybridkv.policies.group_aware.order``).

A change touches only its neighbourhood: the hit point at the changed chunk's
prefix position, the points whose window reaches it, a full-attention
subtree when its root arrives or leaves, and the chain above a point. Values
that depend on wider structure (a point's FLOPs-per-byte share of the chain
above it, a spare chunk's gap to the checkpoint below) are recomputed at the
next decision for the points a change marks *stale*.

Two bounds keep a change local under a widely shared prefix (thousands of
conversations below one system prompt), at the price of exactness there: a
chunk at least ``SHARED`` points share does not mark all of them stale when
that number changes (each one's share moves by under 1/SHARED), and gap
searches and refresh walks visit at most ``WALK_LIMIT`` chunks.

Invariants (checked against the scan-based analysis in the tests): points, needs,
checkpoints, refs, below and the dead pool equal what a full scan of the index
computes after every change; densities, gaps and the spare pool equal it at every
decision unless one of the two bounds was reached.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from sortedcontainers import SortedList

from hybridkv.cost import PrefillCost
from hybridkv.groups import GroupKind, GroupSpec, HybridLayout
from hybridkv.hit_rule import load_window_chunks
from hybridkv.index import SPARE as _SPARE
from hybridkv.index import STORED as _STORED
from hybridkv.index import ChunkIndex
from hybridkv.keys import key_hash, make_key

__all__ = ["HitPoints", "Point", "FAR"]

#: the gap of a spare chunk with no checkpoint past it
FAR = 1 << 62
#: a chunk shared by at least this many hit points: a change in how many share it moves
#: each one's density by under 1/SHARED, so they are not all refreshed for it
SHARED = 64
#: nodes a gap search or a refresh walk below one point visits at most
WALK_LIMIT = 256



@dataclass(slots=True)
class Point:
    needs: tuple[int, ...]  # slots other groups load for a hit here
    firm: bool  # a checkpoint: needs no spare chunk
    density: float = 0.0  # FLOPs saved per byte charged (0 for a non-checkpoint)
    recency: tuple[int, int, int] = (0, 0, 0)  # (max(last_hit, created), position, slot)
    gap: int = FAR  # for a non-checkpoint: distance to the checkpoint below (FAR: none)
    counted: bool = False  # its gap is in its needs' ``_chunk_gap`` minimum


class HitPoints:
    def __init__(self, index: ChunkIndex, layout: HybridLayout, backbone: GroupSpec,
                 cost: PrefillCost):
        self.index = index
        self.layout = layout
        self.bb = backbone.index
        self.cost = cost
        self.near = backbone.chunk_tokens
        self._spec = {g.index: g for g in layout.groups}
        self._full = {g.index for g in layout.groups if g.kind is GroupKind.FULL}
        self._others = [g for g in layout.groups if g.index != self.bb]
        self._other_keys = [(g, make_key(b"", g.index), g.kind) for g in self._others]
        self._window_n: dict[tuple[int, int], int] = {}
        self._bb_suffix = make_key(b"", self.bb)
        #: per sliding group, how deep below a chunk a window that includes it can end
        self._reach = {g.index: max(1, _max_window_chunks(g)) for g in layout.groups
                       if g.kind is GroupKind.SLIDING}
        self.rooted: set[int] = set()
        self.points: dict[int, Point] = {}
        self.refs: dict[int, int] = {}
        self.below: dict[int, int] = {}
        self.needed_by: dict[int, set[int]] = {}
        self.dead = SortedList()  # (last_access, slot) of stored chunks no hit point needs
        self._dead_key: dict[int, tuple[int, int]] = {}
        self.spare = SortedList()  # (-gap, last_access, slot) of expendable spare chunks
        self._spare_key: dict[int, tuple[int, int, int]] = {}
        self.by_recency = SortedList()  # Point.recency
        self.by_density = SortedList()  # (density, slot)
        #: spare-capable chunk -> [smallest gap of the counted non-checkpoints needing it,
        #: how many of them have it]
        self._chunk_gap: dict[int, list[int]] = {}
        self._stale: set[int] = set()  # points whose density / gap must be recomputed
        self._recheck: set[int] = set()  # slots whose hit point must be recomputed
        self._arrived: set[int] = set()  # slots to sync with the pools once points settle
        self._touched: set[int] = set()  # recency changed (dead pool key)
        self._unspared: set[int] = set()  # no longer spare: their points may be checkpoints
        self._hits: set[int] = set()  # a loaded hit ended here (recency, checkpoints above)
        self.rebuild()
        index.subscribe(self)

    # ------------------------------------------------------------------ listener
    def on_present(self, slot: int) -> None:
        self._arrive(slot)

    def on_stored(self, slot: int, completed: bool = False, resized: bool = False) -> None:
        if not completed:
            self._arrive(slot)
            return
        # a reservation completed: the same chunk, present all along (hit points count
        # pending chunks), now stored; only its size may differ from the reservation
        self._arrived.add(slot)
        if resized:
            self._stale.update(self.needed_by.get(slot, ()))
            if self.index._group[slot] == self.bb:
                self._stale_reaching(slot, set())

    def on_absent(self, slot: int) -> None:
        self._leave(slot)

    def on_touch(self, slot: int, was_spare: bool) -> None:
        self._touched.add(slot)
        if was_spare:
            self._unspared.add(slot)

    def on_hit(self, slot: int) -> None:
        self._hits.add(slot)

    def on_clear(self) -> None:
        self.rebuild()

    # ------------------------------------------------------------------ queries
    def is_live(self, slot: int) -> bool:
        if self.index._group[slot] in self._full:
            return self.below.get(slot, 0) > 0
        return self.refs.get(slot, 0) > 0

    def settle(self, *, full: bool = False) -> None:
        """Bring the lazy values (densities, gaps, the spare pool) up to date.

        ``full``: recompute them for every hit point; otherwise for the stale ones.
        """
        self._settle_points()
        if full:
            self._stale.update(self.points)
        if not self._stale:
            return
        stale, self._stale = self._stale, set()
        for p in stale:
            pt = self.points.get(p)
            if pt is None:
                continue
            if pt.firm:
                self._set_density(p, pt, self._density(p, pt))
                continue
            gap = self._gap(p)
            if pt.counted:
                if gap == pt.gap:
                    continue
                pt.counted = False
                for n in pt.needs:
                    self._gap_out(n, pt.gap)
            pt.gap, pt.counted = gap, True
            for n in pt.needs:
                self._gap_in(n, gap)

    # ------------------------------------------------------------------ building
    def rebuild(self) -> None:
        """Recompute everything from the index (at start, or after ``clear``) in O(N).

        The same values the incremental upkeep keeps, computed in passes over the
        chunks by position (parents before children, or children first), as the
        scan-based analysis did; the incremental path takes over from here.
        """
        for part in (self.rooted, self.points, self.refs, self.below, self.needed_by,
                     self.dead, self._dead_key, self.spare, self._spare_key, self.by_recency,
                     self.by_density, self._chunk_gap, self._stale, self._recheck,
                     self._arrived, self._touched, self._unspared, self._hits):
            part.clear()
        ix = self.index
        position, parent, group_of, flags = ix._position, ix._parent, ix._group, ix._flags
        present = sorted(ix._slot.values(), key=position.__getitem__)
        full, bb, rooted = self._full, self.bb, self.rooted
        for s in present:  # parents first
            if group_of[s] in full:
                p = parent[s]
                if position[s] <= self._spec[group_of[s]].chunk_tokens or (
                        p != -1 and p in rooted):
                    rooted.add(s)
        # hit points and what they need
        points = self.points
        for s in present:
            if group_of[s] == bb and s in rooted:
                needs = self._needs(s)
                if needs is not None:
                    points[s] = Point(needs=needs,
                                      firm=not any(flags[n] & _SPARE for n in needs))
        refs, below, needed_by = self.refs, self.below, self.needed_by
        for b, pt in points.items():
            below[b] = below.get(b, 0) + 1
            for n in pt.needs:
                refs[n] = refs.get(n, 0) + 1
                needed_by.setdefault(n, set()).add(b)
                if group_of[n] in full:
                    below[n] = below.get(n, 0) + 1
        for s in reversed(present):  # children first: counts flow up each chain
            c = below.get(s)
            p = parent[s]
            if c and p != -1:
                below[p] = below.get(p, 0) + c
        # shallowest checkpoint at or below each backbone chunk, for the gaps
        checkpoint: dict[int, int] = {}
        for s in reversed(present):
            if group_of[s] != bb:
                continue
            pt = points.get(s)
            if pt is not None and pt.firm:
                checkpoint[s] = s
            cp = checkpoint.get(s)
            p = parent[s]
            if cp is not None and p != -1:
                up = checkpoint.get(p)
                if up is None or position[cp] < position[up]:
                    checkpoint[p] = cp
        last_hit, created = ix._last_hit, ix._created
        for b, pt in points.items():
            pt.recency = (max(last_hit.get(b, 0), created[b]), position[b], b)
            if pt.firm:
                continue
            cp = checkpoint.get(b)
            pt.gap = FAR if cp is None or last_hit.get(cp, 0) > created[b] else \
                position[cp] - position[b]
            pt.counted = True
            for n in pt.needs:
                self._gap_in(n, pt.gap)
        for b, pt in points.items():
            if pt.firm:
                pt.density = self._density(b, pt)
        self.by_recency.update(pt.recency for pt in points.values())
        self.by_density.update((pt.density, b) for b, pt in points.items())
        access = ix._last_access
        dead = []
        for s in present:
            if flags[s] & _STORED and not self.is_live(s):
                key = (access[s], s)
                self._dead_key[s] = key
                dead.append(key)
        self.dead.update(dead)
        for s in list(self._chunk_gap):
            self._spare_sync(s)
        for s in present:  # spare chunks no non-checkpoint counts (none need them: FAR)
            if flags[s] & _SPARE and s not in self._chunk_gap:
                self._spare_sync(s)

    # ------------------------------------------------------------------ arrival / departure
    def _arrive(self, slot: int) -> None:
        """``slot`` became known (pending) or stored (new, or its reservation completed).

        Rootedness is updated at once; the hit points around it are recomputed at the
        next ``_settle_points`` (so a burst of arrivals recomputes each point once).
        """
        if self.index._group[slot] in self._full and slot not in self.rooted \
                and self._root_one(slot):
            self._root_down(slot)
        self._recheck_around(slot)
        self._arrived.add(slot)

    def _leave(self, slot: int) -> None:
        """``slot`` is about to be forgotten: drop now whatever refers to it.

        A departure never creates a hit point, it only ends those that needed the
        chunk: the point at it, the points that load it, and every point of a
        full-attention subtree it was the root of. They are dropped at once, while
        their slots are still valid.
        """
        self._settle_points()
        affected = set(self.needed_by.get(slot, ()))
        if slot in self.points:
            affected.add(slot)
        if slot in self.rooted:
            self.rooted.discard(slot)
            b = self._backbone_at(slot)
            if b is not None:
                affected.add(b)
            for s in self._subtree(slot):  # no longer rooted once ``slot`` leaves
                self.rooted.discard(s)
                b = self._backbone_at(s)
                if b is not None:
                    affected.add(b)
        for b in affected:
            self._drop_point(b)
        self._dead_drop(slot)
        self._spare_drop(slot)
        for part in (self._chunk_gap, self.refs, self.below, self.needed_by):
            part.pop(slot, None)
        self._stale.discard(slot)
        for pending in (self._arrived, self._touched, self._unspared, self._hits):
            pending.discard(slot)

    def _settle_points(self) -> None:
        """Apply what changed since the last call: touches, arrivals and departures' points."""
        if self._unspared:
            unspared, self._unspared = self._unspared, set()
            for slot in unspared:
                self._spare_drop(slot)
                self._recheck.update(self.needed_by.get(slot, ()))
        if self._recheck:
            todo, self._recheck = self._recheck, set()
            ix = self.index
            for b in todo:
                if ix._keys[b] is None or ix._group[b] != self.bb:
                    self._drop_point(b)
                else:
                    self._compute_point(b)
        if self._arrived:
            arrived, self._arrived = self._arrived, set()
            flags = self.index._flags
            for slot in arrived:
                if not flags[slot]:
                    continue  # gone again
                pt = self.points.get(slot)
                if pt is not None:  # created / facts may have changed with the reservation
                    self._set_recency(slot, pt)
                    self._stale.add(slot)
                if flags[slot] & _STORED:
                    if self.is_live(slot):
                        self._dead_drop(slot)
                    else:
                        self._dead_add(slot)
                    self._spare_sync(slot)
        if self._touched:
            touched, self._touched = self._touched, set()
            for slot in touched:
                if slot in self._dead_key:
                    self._dead_add(slot)
        if self._hits:
            hits, self._hits = self._hits, set()
            for slot in hits:
                pt = self.points.get(slot)
                if pt is not None:
                    self._set_recency(slot, pt)
                    if pt.firm:
                        self._stale_up(slot)

    # ------------------------------------------------------------------ points
    def _compute_point(self, b: int) -> None:
        ix = self.index
        needs = self._needs(b) if b in self.rooted else None
        old = self.points.get(b)
        if needs is None:
            if old is not None:
                self._drop_point(b)
            return
        flags = ix._flags
        firm = not any(flags[n] & _SPARE for n in needs)
        if old is not None and old.needs == needs and old.firm == firm:
            return
        if old is not None:
            self._drop_point(b)
        pt = Point(needs=needs, firm=firm)
        self.points[b] = pt
        self._count_up(pt, b, +1)
        for n in needs:
            self._ref(n, +1)
            self.needed_by.setdefault(n, set()).add(b)
        self._set_recency(b, pt)
        self.by_density.add((0.0, b))
        self._stale.add(b)
        self._stale_chain(b)
        if firm:
            self._stale_up(b)

    def _drop_point(self, b: int) -> None:
        pt = self.points.pop(b, None)
        if pt is None:
            return
        self.by_recency.discard(pt.recency)
        self.by_density.discard((pt.density, b))
        self._stale.discard(b)
        self._count_up(pt, b, -1)
        for n in pt.needs:
            users = self.needed_by.get(n)
            if users is not None:
                users.discard(b)
                if not users:
                    del self.needed_by[n]
            self._ref(n, -1)
            if pt.counted:
                self._gap_out(n, pt.gap)
            self._spare_sync(n)  # liveness may have changed too
        self._stale_chain(b)
        if pt.firm:
            self._stale_up(b)

    def _needs(self, b: int) -> tuple[int, ...] | None:
        ix = self.index
        h = key_hash(ix._keys[b])
        position = ix._position[b]
        needs: list[int] = []
        slot_of = ix._slot.get
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
                    if ix._position[cur] <= g.chunk_tokens:
                        break
                    cur = ix._parent[cur]
            else:
                needs.append(s)
        return tuple(needs)

    def _set_recency(self, b: int, pt: Point) -> None:
        ix = self.index
        rec = (max(ix._last_hit.get(b, 0), ix._created[b]), ix._position[b], b)
        if rec != pt.recency:
            self.by_recency.discard(pt.recency)
            pt.recency = rec
            self.by_recency.add(rec)

    def _set_density(self, b: int, pt: Point, density: float) -> None:
        if density != pt.density:
            self.by_density.discard((pt.density, b))
            pt.density = density
            self.by_density.add((density, b))

    # ------------------------------------------------------------------ counts
    def _count_up(self, pt: Point, b: int, delta: int) -> None:
        """Hit point ``b`` appears (+1) or goes (-1): below counts of every chain it uses."""
        self._chain_add(b, delta)
        ix = self.index
        for n in pt.needs:
            if ix._group[n] in self._full:
                self._chain_add(n, delta)

    def _chain_add(self, slot: int, delta: int) -> None:
        ix = self.index
        parent = ix._parent
        s = slot
        while s != -1:
            before = self.below.get(s, 0)
            after = before + delta
            if after:
                self.below[s] = after
            else:
                self.below.pop(s, None)
            if (before == 0) != (after == 0) and ix._flags[s] & _STORED:
                if after:
                    self._dead_drop(s)
                else:
                    self._dead_add(s)
            s = parent[s]

    def _ref(self, slot: int, delta: int) -> None:
        ix = self.index
        before = self.refs.get(slot, 0)
        after = before + delta
        if after:
            self.refs[slot] = after
        else:
            self.refs.pop(slot, None)
        users = self.needed_by.get(slot, ())
        if len(users) < SHARED:  # a widely shared chunk: each share moves by < 1/SHARED
            self._stale.update(users)
        if ix._group[slot] in self._full:
            return  # liveness of a full-attention chunk follows ``below``
        if (before == 0) != (after == 0) and ix._flags[slot] & _STORED:
            if after:
                self._dead_drop(slot)
            else:
                self._dead_add(slot)

    # ------------------------------------------------------------------ rootedness
    def _root_one(self, slot: int) -> bool:
        ix = self.index
        g = self._spec[ix._group[slot]]
        p = ix._parent[slot]
        if ix._position[slot] <= g.chunk_tokens or (p != -1 and p in self.rooted):
            self.rooted.add(slot)
            return True
        return False

    def _root_down(self, slot: int) -> None:
        stack = list(self.index.child_slots(slot))
        while stack:
            s = stack.pop()
            if s in self.rooted:
                continue
            self.rooted.add(s)
            self._recheck_around(s)
            stack.extend(self.index.child_slots(s))

    def _subtree(self, slot: int) -> Iterator[int]:
        stack = list(self.index.child_slots(slot))
        while stack:
            s = stack.pop()
            yield s
            stack.extend(self.index.child_slots(s))

    # ------------------------------------------------------------------ neighbourhood
    def _backbone_at(self, slot: int) -> int | None:
        ix = self.index
        if ix._group[slot] == self.bb:
            return slot
        return ix._slot.get(key_hash(ix._keys[slot]) + self._bb_suffix)

    def _window_points(self, slot: int) -> set[int]:
        """Backbone slots whose window in ``slot``'s (sliding) group may include it."""
        out: set[int] = set()
        depth = self._reach[self.index._group[slot]]
        level = [slot]
        for _ in range(depth):
            nxt = []
            for s in level:
                b = self._backbone_at(s)
                if b is not None:
                    out.add(b)
                nxt.extend(self.index.child_slots(s))
            level = nxt
            if not level:
                break
        return out

    def _recheck_around(self, slot: int) -> None:
        b = self._backbone_at(slot)
        if b is not None:
            self._recheck.add(b)
        if self.index._group[slot] in self._reach:
            self._recheck.update(self._window_points(slot))
        self._recheck.update(self.needed_by.get(slot, ()))

    # ------------------------------------------------------------------ lazy values
    def _stale_up(self, b: int) -> None:
        """A checkpoint at ``b`` changed: points above it (up to a checkpoint) are stale."""
        ix = self.index
        s = ix._parent[b]
        while s != -1:
            pt = self.points.get(s)
            if pt is not None:
                self._stale.add(s)
                if pt.firm:
                    break
            s = ix._parent[s]
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
                    if pt.firm:
                        continue
                stack.extend(self.index.child_slots(s))

    def _stale_chain(self, b: int) -> None:
        """A point at ``b`` came or went: ``below`` changed on its whole chain.

        A point's density charges it a share of each chunk from itself up to (not
        including) the checkpoint above it, so the points to refresh are, for each
        chunk of the chain, those that reach it going up without meeting a checkpoint.
        """
        parent = self.index._parent
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
        if (pt is not None and pt.firm) or self.below.get(s, 0) >= SHARED:
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
                if under.firm:
                    continue
            stack.extend(x for x in ix.child_slots(c) if x not in seen)

    def _density(self, b: int, pt: Point) -> float:
        """FLOPs the point saves over the checkpoint above it, per byte charged to it."""
        ix = self.index
        size = 0.0
        for n in pt.needs:
            size += ix._size[n] / self.refs[n]
        size += ix._size[b] / max(1, self.below.get(b, 1))
        base = 0
        up = ix._parent[b]
        while up != -1:
            above = self.points.get(up)
            if above is not None and above.firm:
                base = ix._position[up]
                break
            size += ix._size[up] / max(1, self.below.get(up, 1))
            up = ix._parent[up]
        value = self.cost.prefill_flops(ix._position[b]) - self.cost.prefill_flops(base)
        return value / max(1.0, size)

    def _gap(self, b: int) -> int:
        """From a non-checkpoint to the shallowest checkpoint below it (FAR: none, or hit since)."""
        ix = self.index
        position, points = ix._position, self.points
        best, best_pos = -1, FAR
        level = list(ix.child_slots(b))
        budget = WALK_LIMIT
        while level and best == -1 and budget > 0:  # level by level: shallowest first
            nxt = []
            for s in level:
                budget -= 1
                pt = points.get(s)
                if pt is not None and pt.firm:
                    if position[s] < best_pos:
                        best, best_pos = s, position[s]
                    continue
                nxt.extend(ix.child_slots(s))
            level = nxt
        if best == -1 or ix._last_hit.get(best, 0) > ix._created[b]:
            return FAR
        return best_pos - position[b]

    def _gap_in(self, slot: int, gap: int) -> None:
        """A non-checkpoint needing ``slot`` counts with ``gap``: keep the minimum."""
        cur = self._chunk_gap.get(slot)
        if cur is None or gap < cur[0]:
            self._chunk_gap[slot] = [gap, 1]
            self._spare_sync(slot)
        elif gap == cur[0]:
            cur[1] += 1

    def _gap_out(self, slot: int, gap: int) -> None:
        """A non-checkpoint with ``gap`` stops counting for ``slot``."""
        cur = self._chunk_gap.get(slot)
        if cur is None or gap != cur[0]:
            return
        cur[1] -= 1
        if cur[1] > 0:
            return
        best, count = FAR, 0
        points = self.points
        for p in self.needed_by.get(slot, ()):
            pt = points[p]
            if pt.counted and not pt.firm:
                if pt.gap < best:
                    best, count = pt.gap, 1
                elif pt.gap == best:
                    count += 1
        if count:
            self._chunk_gap[slot] = [best, count]
        else:
            del self._chunk_gap[slot]
        self._spare_sync(slot)

    # ------------------------------------------------------------------ pools
    def _dead_add(self, slot: int) -> None:
        self._dead_drop(slot)
        key = (self.index._last_access[slot], slot)
        self._dead_key[slot] = key
        self.dead.add(key)

    def _dead_drop(self, slot: int) -> None:
        key = self._dead_key.pop(slot, None)
        if key is not None:
            self.dead.discard(key)

    def _spare_sync(self, slot: int) -> None:
        ix = self.index
        flags = ix._flags[slot]
        cur = self._chunk_gap.get(slot)
        gap = FAR if cur is None else cur[0]
        if (not flags & _STORED or not flags & _SPARE or gap <= self.near
                or not self.is_live(slot)):
            self._spare_drop(slot)
            return
        key = (-gap, ix._last_access[slot], slot)
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


def _max_window_chunks(group: GroupSpec) -> int:
    c = group.chunk_tokens
    return max(load_window_chunks(group, c * 4 + r) or 1 for r in range(c))
