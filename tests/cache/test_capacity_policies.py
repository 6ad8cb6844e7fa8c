"""Capacity settings and policy-specific behaviour: the watermark cleaner, headroom.

The watermark cleaner (``Capacity.enforce``) leaves chunks of requests still
storing alone; ``headroom`` frees more than needed so eviction runs rarely, and
a bad headroom value is refused.
"""

from __future__ import annotations

import pytest

from hybridkv.capacity import Capacity
from hybridkv.index import ChunkIndex
from hybridkv.policies import Candidate, RequestView, make_policy

from capacity_helpers import (
    C,
    FULL,
    ONE,
    TINY,
    Sim,
    make_layout,
    request_keys,
)

pytestmark = pytest.mark.fast


def test_watermark_cleaner_spares_chunks_of_a_request_still_storing():
    layout = make_layout((FULL,), pages=TINY, layers=ONE)
    index = ChunkIndex()
    cap = Capacity(index, make_policy("watermark", layout), 1000)
    open_req, later = request_keys(layout, (0, 1, 2))[0], request_keys(layout, (5, 6, 7, 8, 9, 4))[0]

    def offer(rid, keys):
        batch = [Candidate(k, 0, (i + 1) * C, 100, keys[i - 1] if i else None)
                 for i, k in enumerate(keys)]
        return cap.plan_store(batch, RequestView(rid, {c.key: c.position for c in batch}))

    assert len(offer("open", open_req).admitted) == 3  # still storing: never finished
    for i, k in enumerate(open_req):
        cap.commit(k, size=100, position=(i + 1) * C, parent=open_req[i - 1] if i else None)
    assert len(offer("later", later).admitted) == 6
    for i, k in enumerate(later):  # both requests are storing: the cleaner finds nothing
        assert cap.commit(k, size=100, position=(i + 1) * C,
                          parent=later[i - 1] if i else None) == []
    cap.request_finished("later")
    evicted = cap.enforce()
    # 900 bytes > 85% of 1000: the cleaner went down to 70%; the open request's chunks are
    # the least recently used but are not touched, the finished one's oldest went
    assert evicted == later[:2] and index.bytes_used == 700
    assert all(k in index for k in open_req)
    cap.request_finished("open")
    assert set(cap.enforce()) == set()  # under the high watermark now: nothing more to do


@pytest.mark.parametrize("policy", ["group_aware", "lru"])
def test_headroom_frees_more_than_needed_so_eviction_runs_rarely(policy):
    """Requests of 2 chunks each into a budget of 10: with 20% headroom an eviction frees
    the shortfall plus 2 chunks, so it runs on every other request instead of every one."""
    layout = make_layout((FULL,), pages=TINY, layers=ONE)
    calls = {}
    for headroom in (0.0, 0.2):
        sim = Sim(layout, policy, 1000, headroom=headroom)
        for n in range(20):
            sim.request((n, 100 + n))
            assert sim.index.bytes_used <= 1000
        calls[headroom] = sim.cap.victim_calls
    assert calls[0.0] == 15  # full after 5 requests, then one eviction per request
    assert calls[0.2] == 8
    with pytest.raises(ValueError, match="headroom"):
        Capacity(ChunkIndex(), make_policy(policy, layout), 1000, headroom=1.5)
