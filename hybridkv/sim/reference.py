"""The reference policy: offline, future-aware (Belady-style) capacity decisions (simulator only).

It is built from the whole trace, so it knows every later request. Each
request r has one *demand*: the chunks its hit would load under an unbounded
store (the hit rule, ``hit_rule.servable_tokens``: every full-attention chunk
up to the hit, the window before it in each sliding-window group, the state
exactly at it in each state group). A chunk's *next use* is the earliest live
demand after the current request that needs it (never, if none).

- Admission: the offered chunks are taken demand by demand, soonest demand
  first; a demand's new chunks are admitted when they fit in the budget next to
  every stored chunk used no later than it and the demands admitted before it
  (Belady with bypass); other chunks are rejected (a chunk no later request
  needs is always rejected).
- Eviction: the stored chunk used farthest in the future goes first (never
  used first).
- A demand whose chunk is absent (evicted or not admitted) with no request
  before it offering the chunk again aims at the deepest shallower hit of the
  same request that can still be stored, or dies; chunks stop counting a use
  they no longer serve, so the policy never keeps a window or a state for a
  hit whose prefix it dropped. A demand that does not fit at its last offer may
  take a shallower hit into space no other demand uses.

Replay calls ``advance(n)`` before request n (``replay(..., policy="reference")``)
and gives it no eviction headroom (that only amortises the online policies' search).

Invariants: the ``CapacityPolicy`` ones (victims are stored, unpinned,
unprotected, each named once); the next use kept for a stored chunk is its
earliest live demand after now; ties never depend on key bytes, so a trace cut
into other block sizes gives the same decisions.

Not optimal (an upper-ish bound): joint caching with sizes is NP-hard; demands
are ranked by time alone, not by tokens saved per byte; each request aims at one
hit, lowered only when that hit is lost for good; decisions are greedy per request.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, bisect_right
from collections.abc import Collection, Sequence

from hybridkv.groups import GroupKind, GroupSpec, HybridLayout
from hybridkv.hit_rule import load_window_chunks, servable_tokens
from hybridkv.index import ChunkIndex
from hybridkv.policies.base import Admission, Candidate, CapacityPolicy, RequestView

__all__ = ["ReferencePolicy", "hit_keys"]

#: a request's chunk keys: one list per group (layout order), one key per complete chunk
RequestKeys = Sequence[Sequence[bytes]]


def hit_keys(groups: Sequence[GroupSpec], keys: RequestKeys, hit: int) -> list[bytes]:
    """The keys a hit of ``hit`` tokens loads (per group, in prefix order), as replay loads them."""
    if not hit:
        return []
    out: list[bytes] = []
    for g, gkeys in zip(groups, keys):
        end = -(-hit // g.chunk_tokens)
        if g.kind is GroupKind.FULL:
            out += gkeys[:end]
        else:
            out += gkeys[max(0, end - (load_window_chunks(g, hit) or 1)):end]
    return out


class _Fenwick:
    """Prefix sums of bytes over next-use times 0..n."""

    def __init__(self, n: int) -> None:
        self.tree = [0] * (n + 2)

    def add(self, i: int, v: int) -> None:
        i += 1
        while i < len(self.tree):
            self.tree[i] += v
            i += i & -i

    def prefix(self, i: int) -> int:
        """Sum over times <= i."""
        i += 1
        s = 0
        while i > 0:
            s += self.tree[i]
            i -= i & -i
        return s


class ReferencePolicy(CapacityPolicy):
    name = "reference"

    def __init__(self, layout: HybridLayout, requests: Sequence[RequestKeys],
                 num_tokens: Sequence[int], budget: int | None):
        if len(requests) != len(num_tokens):
            raise ValueError("one prompt length per request is needed")
        groups = layout.groups
        self._groups = groups
        self.spine_groups = frozenset(g.index for g in layout.groups_of(GroupKind.FULL))
        self.budget = budget
        self._never = n = len(requests)
        self._rkeys = requests
        self._hit: list[int] = []  # the unbounded hit (tokens)
        self._level: list[int] = []  # chunks of the hit aimed for (0: none)
        self._active: list[frozenset[bytes]] = []  # what that hit loads
        self._occ: dict[bytes, list[int]] = {}  # key -> requests that have it
        self._need: dict[bytes, list[int]] = {}  # key -> requests a hit may need it for
        seen: set[bytes] = set()
        c = groups[0].chunk_tokens
        for r, (keys, tokens) in enumerate(zip(requests, num_tokens)):
            by_group = {g.index: gk for g, gk in zip(groups, keys)}
            hit = servable_tokens(groups, lambda g, i: by_group[g][i] in seen, tokens)
            level = -(-hit // c)
            self._hit.append(hit)
            self._level.append(level)
            self._active.append(frozenset(hit_keys(groups, keys, hit)))
            for gk in keys:
                for k in gk[:level]:  # a hit at or below the unbounded one may need these
                    self._need.setdefault(k, []).append(r)
                for k in gk:
                    self._occ.setdefault(k, []).append(r)
                seen.update(gk)
        self._alive = bytearray(b"\x01") * n  # demand not yet served and not dead
        self._ptr: dict[bytes, int] = {}
        self._now = -1
        self._synced = 0  # requests before this one are reconciled with the index
        self._offered: list[bytes] = []  # keys offered by request ``_synced_offer``
        self._synced_offer = -1
        self._retired = -1  # demands up to this one are retired
        # mirror of the stored chunks: size, next use; bytes by next use; max-heap by next use
        self._size: dict[bytes, int] = {}
        self._nu: dict[bytes, int] = {}
        self._total = 0
        self._fen = _Fenwick(n)
        self._heap: list[tuple[int, int, bytes]] = []
        # ties between equal next uses: deeper chunks first, then by group and by the first
        # request that has the chunk (never by key bytes, so the result does not depend on
        # how the trace's blocks were cut)
        groups_n = len(groups)
        self._tie: dict[bytes, int] = {}
        for r, keys in enumerate(self._rkeys):
            for gi, gk in enumerate(keys):
                for i, k in enumerate(gk):
                    if k not in self._tie:
                        self._tie[k] = -((i * groups_n + gi) * (n + 1) + (n - r))

    def _needs_at(self, r: int, level: int) -> frozenset[bytes]:
        """What request ``r``'s hit of ``level`` chunks loads."""
        if level == self._level[r]:
            return self._active[r]
        c = self._groups[0].chunk_tokens
        hit = self._hit[r] if level * c >= self._hit[r] else level * c
        return frozenset(hit_keys(self._groups, self._rkeys[r], hit))

    def _possible(self, r: int, needs: Collection[bytes], offered: Collection[bytes] = ()) -> bool:
        """Can every chunk in ``needs`` be stored when request ``r`` comes?"""
        for k in needs:
            if k in self._size or k in offered:
                continue
            occ = self._occ[k]
            i = bisect_left(occ, self._now)  # the current request offers its chunks too
            if i >= len(occ) or occ[i] >= r:
                return False
        return True

    def _lower(self, r: int, below: int, offered: Collection[bytes] = (),
               fits=None) -> bool:
        """Aim request ``r`` at its deepest possible hit under ``below`` chunks (that ``fits``).

        Without ``fits``, the demand dies when there is none. Returns whether one was found.
        """
        old = self._active[r]
        for level in range(min(below, self._level[r]) - 1, 0, -1):
            needs = self._needs_at(r, level)
            if self._possible(r, needs, offered) and (fits is None or fits(needs)):
                self._level[r], self._active[r] = level, needs
                for k in old - needs:
                    if self._nu.get(k) == r:
                        self._update(k)
                for k in needs - old:
                    self._ptr.pop(k, None)
                    if k in self._nu:
                        self._update(k)
                return True
        if fits is None:
            self._kill(r)
        return False

    def _last_offer(self, r: int, keys: Collection[bytes]) -> bool:
        """Is the current request the last to offer one of ``keys`` before request ``r``?"""
        for k in keys:
            occ = self._occ[k]
            i = bisect_right(occ, self._now)
            if i >= len(occ) or occ[i] >= r:
                return True
        return False

    # ------------------------------------------------------------------ time
    def advance(self, n: int) -> None:
        """Request ``n`` (0-based, in trace order) is next."""
        if n <= self._now:
            raise ValueError(f"requests must advance: {n} after {self._now}")
        self._now = n

    def _sync(self, index: ChunkIndex) -> None:
        """Reconcile the mirror with the index for finished requests; retire served demands."""
        for r in range(self._synced, max(self._synced, self._now)):
            # its hit's chunks are stored and mirrored already: only offered ones changed
            offered = self._offered if r == self._synced_offer else (
                k for gk in self._rkeys[r] for k in gk)
            for k in offered:
                entry = index.get(k)
                if entry is not None:
                    if k not in self._size:
                        self._store(k, entry.size)
                else:
                    if k in self._size:
                        self._drop(k)
                    self._absent(k, r)
        self._synced = max(self._synced, self._now)
        for r in range(self._retired + 1, self._now + 1):
            self._kill(r)
        self._retired = max(self._retired, self._now)

    # ------------------------------------------------------------------ next use
    def _next_use(self, k: bytes, after: int | None = None) -> int:
        """The earliest live demand needing ``k`` after now (or after ``after``)."""
        need = self._need.get(k)
        if not need:
            return self._never
        alive, active = self._alive, self._active
        if after is None:
            i = self._ptr.get(k)
            if i is None:
                i = bisect_right(need, self._now)
            while i < len(need) and (need[i] <= self._now or not alive[need[i]]
                                     or k not in active[need[i]]):
                i += 1
            self._ptr[k] = i
        else:
            i = bisect_right(need, after)
            while i < len(need) and (not alive[need[i]] or k not in active[need[i]]):
                i += 1
        return need[i] if i < len(need) else self._never

    def _store(self, k: bytes, size: int) -> None:
        nu = self._next_use(k)
        self._size[k] = size
        self._nu[k] = nu
        self._total += size
        self._fen.add(nu, size)
        heapq.heappush(self._heap, (-nu, self._tie[k], k))

    def _drop(self, k: bytes) -> None:
        size = self._size.pop(k)
        self._total -= size
        self._fen.add(self._nu.pop(k), -size)

    def _update(self, k: bytes) -> None:
        old = self._nu[k]
        nu = self._next_use(k)
        if nu != old:
            size = self._size[k]
            self._fen.add(old, -size)
            self._fen.add(nu, size)
            self._nu[k] = nu
            heapq.heappush(self._heap, (-nu, self._tie[k], k))

    def _kill(self, r: int) -> None:
        """Demand ``r`` no longer counts (served, or no hit of it can be there)."""
        if r >= self._never or not self._alive[r]:
            return
        self._alive[r] = 0
        for k in self._active[r]:
            if self._nu.get(k) == r:
                self._update(k)

    def _absent(self, k: bytes, at: int) -> None:
        """``k`` is not stored after request ``at``: the next request that has it cannot load it."""
        occ = self._occ.get(k, ())
        i = bisect_right(occ, at)
        if i < len(occ):
            nxt = occ[i]
            if self._alive[nxt] and k in self._active[nxt]:
                self._lower(nxt, self._level[nxt])

    # ------------------------------------------------------------------ policy
    def admit(self, batch: Sequence[Candidate], request: RequestView,
              index: ChunkIndex) -> list[Admission]:
        self._sync(index)
        self._offered = [c.key for c in batch]
        self._synced_offer = self._now
        verdict = {c.key: Admission.REJECT for c in batch}
        size = {c.key: c.size for c in batch}
        todo: list[tuple[int, int, bytes]] = []
        for c in batch:
            t = self._next_use(c.key)
            if t < self._never:
                todo.append((t, self._tie[c.key], c.key))
        if self.budget is None:
            for _, _, k in todo:
                verdict[k] = Admission.ADMIT
            return [verdict[c.key] for c in batch]
        heapq.heapify(todo)
        # stored chunks that cannot go now (the request's own), by next use
        own = sorted((self._nu[k], self._size[k]) for k in request.positions if k in self._size)
        own_nu = [t for t, _ in own]
        own_after = [0] * (len(own) + 1)  # bytes of own chunks used after own_nu[i - 1]
        for i in range(len(own) - 1, -1, -1):
            own_after[i] = own_after[i + 1] + own[i][1]
        fixed = index.bytes_used - self._total  # reservations the mirror does not hold
        accepted = 0
        decided: set[bytes] = set()
        tried: set[int] = set()  # demands weighed already (each once)
        while todo:
            t, _, k = heapq.heappop(todo)
            if k in decided or t in tried:
                continue
            tried.add(t)
            keep = (fixed + self._fen.prefix(t) + own_after[bisect_right(own_nu, t)]
                    + accepted)

            def fits(needs: Collection[bytes], keep: int = keep) -> bool:
                return keep + sum(size[m] for m in needs
                                  if m in verdict and m not in decided) <= self.budget

            members = [m for m in self._active[t] if m in verdict and m not in decided]
            if not fits(members) and self._last_offer(t, members):
                # its hit cannot be stored any more; a shallower one may fit into space no
                # other demand will use (its last window or state may be stored already)
                free = fixed + self._fen.prefix(self._never - 1) + own_after[0] + accepted
                self._lower(t, self._level[t], offered=verdict,
                            fits=lambda needs: fits(needs, free))
            members = [m for m in self._active[t] if m in verdict and m not in decided]
            if self._alive[t] and fits(members):
                accepted += sum(size[m] for m in members)
                for m in members:
                    verdict[m] = Admission.ADMIT
                    decided.add(m)
                continue
            for m in members:
                later = self._next_use(m, after=t)
                if later < self._never:
                    heapq.heappush(todo, (later, self._tie[m], m))
                else:
                    decided.add(m)
        return [verdict[c.key] for c in batch]

    def victims(self, index: ChunkIndex, needed: int, protect: Collection[bytes] = (), *,
                expendable: int = 0) -> list[bytes]:
        self._sync(index)
        chosen: list[bytes] = []
        held: list[tuple[int, int, bytes]] = []
        freed = 0
        heap = self._heap
        while freed < needed and heap:
            item = heapq.heappop(heap)
            neg, _, k = item
            if self._nu.get(k) != -neg:
                continue  # stale: dropped, or its next use changed (a newer item exists)
            entry = index.get(k)
            if entry is None or entry.pins or k in protect:
                held.append(item)
                continue
            chosen.append(k)
            freed += self._size[k]
            self._drop(k)
            self._absent(k, self._now)
        for item in held:
            heapq.heappush(heap, item)
        if len(heap) > 4 * len(self._nu) + 1024:
            self._heap = [(-t, self._tie[k], k) for k, t in self._nu.items()]
            heapq.heapify(self._heap)
        return chosen
