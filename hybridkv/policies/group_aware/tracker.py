"""Hit points kept up to date as chunks come and go (no scan of the index per decision).

``HitPointTracker`` listens to a ``ChunkIndex`` and maintains, for the chunks it
holds (stored or pending):

- ``rooted`` (``rooting``): full-attention chunks whose chain reaches the prefix start;
- ``points``: spine slot -> ``Point`` (``point``: what other groups load for a hit
  there, ``needs``; whether it is a *checkpoint*: it needs no spare chunk);
- ``refs``, ``needed_by``, ``points_below`` (``counts``): what makes a chunk live;
- the pools (``pools``): ``dead`` and ``spare``; and the hit points by recency and
  by FLOPs per byte (``by_recency``, ``by_density``; merged by ``order``).

A change touches only its neighbourhood (``needs``): the hit point at the changed
chunk's prefix position, the points whose window reaches it, a full-attention
subtree when its root arrives or leaves, and the chain above a point. Values that
depend on wider structure (``lazy_values``: a point's FLOPs-per-byte share of the
chain above it, a spare chunk's gap to the checkpoint below) are recomputed at the
next decision (``settle``) for the points a change marks *stale*. ``rebuild``
computes everything from scratch.

Two bounds keep a change local under a widely shared prefix (thousands of
conversations below one system prompt), at the price of exactness there: a chunk
at least ``SHARED`` points share does not mark all of them stale when that number
changes (each one's share moves by under 1/SHARED), and gap searches and refresh
walks visit at most ``WALK_LIMIT`` chunks.

Names in the code of the tracker and its parts: ``b`` is a hit point's spine slot,
``pt`` its ``Point``, ``n`` a slot it needs, ``s`` / ``c`` / ``p`` any slot / a child /
a parent.

Invariants (checked against the scan-based analysis in the tests): points, needs,
checkpoints, refs, points_below and the dead pool equal what a full scan of the
index computes after every change; densities, gaps and the spare pool equal it at
every decision unless one of the two bounds was reached.
"""

from __future__ import annotations

from sortedcontainers import SortedList

from hybridkv.cost import PrefillCost
from hybridkv.groups import GroupKind, GroupSpec, HybridLayout
from hybridkv.index import SPARE, STORED, ChunkIndex
from hybridkv.keys import make_key
from hybridkv.policies.group_aware.counts import Counts
from hybridkv.policies.group_aware.lazy_values import LazyValues
from hybridkv.policies.group_aware.needs import Needs, max_window_chunks
from hybridkv.policies.group_aware.point import Point
from hybridkv.policies.group_aware.pools import Pools
from hybridkv.policies.group_aware.rebuild import Rebuild
from hybridkv.policies.group_aware.rooting import Rooting

__all__ = ["HitPointTracker"]


class HitPointTracker(Rebuild, Needs, LazyValues, Counts, Rooting, Pools):
    def __init__(self, index: ChunkIndex, layout: HybridLayout, spine: GroupSpec,
                 cost: PrefillCost):
        self.index = index
        self.columns = index.columns
        self.layout = layout
        self.cost = cost
        #: the spine group (the first full-attention group) and the tokens of one chunk
        self.spine_group = spine.index
        self.spine_chunk = spine.chunk_tokens
        self._spec = {g.index: g for g in layout.groups}
        self._full = {g.index for g in layout.groups if g.kind is GroupKind.FULL}
        self._other_keys = [(g, make_key(b"", g.index), g.kind) for g in layout.groups
                            if g.index != self.spine_group]
        self._window_n: dict[tuple[int, int], int] = {}
        self._spine_suffix = make_key(b"", self.spine_group)
        #: per sliding group, how deep below a chunk a window that includes it can end
        self._reach = {g.index: max(1, max_window_chunks(g)) for g in layout.groups
                       if g.kind is GroupKind.SLIDING}
        self.rooted: set[int] = set()
        self.points: dict[int, Point] = {}
        self.refs: dict[int, int] = {}
        self.points_below: dict[int, int] = {}
        self.needed_by: dict[int, set[int]] = {}
        self.dead = SortedList()  # (last_access, slot) of stored chunks no hit point needs
        self._dead_key: dict[int, tuple[int, int]] = {}
        self.spare = SortedList()  # (-gap, last_access, slot) of expendable spare chunks
        self._spare_key: dict[int, tuple[int, int, int]] = {}
        self.by_recency = SortedList()  # Point.recency
        self.by_density = SortedList()  # (density, slot)
        #: spare-capable chunk -> [smallest gap of the counted non-checkpoints needing it,
        #: how many of them have it]
        self._smallest_gap: dict[int, list[int]] = {}
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
            if self.columns.group[slot] == self.spine_group:
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

    # ------------------------------------------------------------------ decisions
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
        for b in stale:
            pt = self.points.get(b)
            if pt is None:
                continue
            if pt.checkpoint:
                self._set_density(b, pt, self._density(b, pt))
                continue
            gap = self._gap(b)
            if pt.gap_counted:
                if gap == pt.gap:
                    continue
                pt.gap_counted = False
                for n in pt.needs:
                    self._gap_out(n, pt.gap)
            pt.gap, pt.gap_counted = gap, True
            for n in pt.needs:
                self._gap_in(n, gap)

    # ------------------------------------------------------------------ arrival / departure
    def _arrive(self, slot: int) -> None:
        """``slot`` became known (pending) or stored (new, or its reservation completed).

        Rootedness is updated at once; the hit points around it are recomputed at the
        next ``_settle_points`` (so a burst of arrivals recomputes each point once).
        """
        if self.columns.group[slot] in self._full and slot not in self.rooted \
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
            b = self._spine_at(slot)
            if b is not None:
                affected.add(b)
            for s in self._subtree(slot):  # no longer rooted once ``slot`` leaves
                self.rooted.discard(s)
                b = self._spine_at(s)
                if b is not None:
                    affected.add(b)
        for b in affected:
            self._drop_point(b)
        self._dead_drop(slot)
        self._spare_drop(slot)
        for part in (self._smallest_gap, self.refs, self.points_below, self.needed_by):
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
            cols = self.columns
            for b in todo:
                if cols.keys[b] is None or cols.group[b] != self.spine_group:
                    self._drop_point(b)
                else:
                    self._compute_point(b)
        if self._arrived:
            arrived, self._arrived = self._arrived, set()
            flags = self.columns.flags
            for slot in arrived:
                if not flags[slot]:
                    continue  # gone again
                pt = self.points.get(slot)
                if pt is not None:  # created / facts may have changed with the reservation
                    self._set_recency(slot, pt)
                    self._stale.add(slot)
                if flags[slot] & STORED:
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
                    if pt.checkpoint:
                        self._stale_up(slot)

    # ------------------------------------------------------------------ points
    def _compute_point(self, b: int) -> None:
        needs = self._needs(b) if b in self.rooted else None
        old = self.points.get(b)
        if needs is None:
            if old is not None:
                self._drop_point(b)
            return
        flags = self.columns.flags
        checkpoint = not any(flags[n] & SPARE for n in needs)
        if old is not None and old.needs == needs and old.checkpoint == checkpoint:
            return
        if old is not None:
            self._drop_point(b)
        pt = Point(needs=needs, checkpoint=checkpoint)
        self.points[b] = pt
        self._count_up(pt, b, +1)
        for n in needs:
            self._ref(n, +1)
            self.needed_by.setdefault(n, set()).add(b)
        self._set_recency(b, pt)
        self.by_density.add((0.0, b))
        self._stale.add(b)
        self._stale_chain(b)
        if checkpoint:
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
            if pt.gap_counted:
                self._gap_out(n, pt.gap)
            self._spare_sync(n)  # liveness may have changed too
        self._stale_chain(b)
        if pt.checkpoint:
            self._stale_up(b)

    def _set_recency(self, b: int, pt: Point) -> None:
        cols = self.columns
        rec = (max(cols.last_hit.get(b, 0), cols.created[b]), cols.position[b], b)
        if rec != pt.recency:
            self.by_recency.discard(pt.recency)
            pt.recency = rec
            self.by_recency.add(rec)

    def _set_density(self, b: int, pt: Point, density: float) -> None:
        if density != pt.density:
            self.by_density.discard((pt.density, b))
            pt.density = density
            self.by_density.add((density, b))
