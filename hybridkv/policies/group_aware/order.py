"""The utility order of hit points, produced lazily from two sorted lists.

Utility (Marconi): ``rank / (N - 1) + alpha * density / top``, where ``rank`` is a
point's place in recency order, ``density`` the FLOPs it saves per byte charged
to it and ``top`` the largest density (1 when all are 0). Both terms are
normalised over all N points, so no per-point key can be stored; instead the
order is merged from the points sorted by recency and by density (Fagin's
threshold algorithm): any point not yet seen scores at least
``next_rank / (N - 1) + alpha * next_density / top``, so a seen point scoring
below that is next (one scoring exactly that waits: an unseen point may tie it
and be less recently used). An eviction retires a few points, so it reads a few entries
of each list: O(k log N) for k points, not O(N).

Invariant: the sequence equals sorting every point by (utility, rank): equal utility,
less recently used first.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

from hybridkv.policies.group_aware.tracker import HitPointTracker

__all__ = ["utility_order"]


def utility_order(hp: HitPointTracker, alpha: float) -> Iterator[int]:
    """Spine slots of the hit points, lowest utility first (call ``hp.settle()`` before)."""
    n = len(hp.points)
    if n == 0:
        return
    by_recency, by_density, points = hp.by_recency, hp.by_density, hp.points
    denom = max(1, n - 1)
    top = by_density[-1][0] or 1.0
    seen: set[int] = set()
    heap: list[tuple[float, int, int]] = []
    ri = di = 0
    while ri < n or di < n:
        if ri < n:
            slot = by_recency[ri][2]
            if slot not in seen:
                seen.add(slot)
                heapq.heappush(heap, (ri / denom + alpha * points[slot].density / top, ri, slot))
            ri += 1
        if di < n:
            density, slot = by_density[di]
            if slot not in seen:
                seen.add(slot)
                rank = by_recency.index(points[slot].recency)
                heapq.heappush(heap, (rank / denom + alpha * density / top, rank, slot))
            di += 1
        if ri < n and di < n:
            threshold = ri / denom + alpha * by_density[di][0] / top
        else:
            threshold = float("inf")
        while heap and heap[0][0] < threshold:  # a tie may still lose to an unseen point
            yield heapq.heappop(heap)[2]
    while heap:
        yield heapq.heappop(heap)[2]
