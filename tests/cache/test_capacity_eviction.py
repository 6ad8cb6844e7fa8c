"""Capacity eviction order: what goes when room is needed.

Hand-built cases with exact sizes through ``capacity_helpers.Sim``: group_aware
keeps a shared prefix and the newest end state, removing a spine chunk reclaims
every deeper chunk on its prefix (never a pinned one), and later requests retire
older hit points before the spare chunks a follow-up question needs. Names:
F / W / S (full, window, state) + the chunk ids of the prefix.
"""

from __future__ import annotations

import pytest

from hybridkv.capacity import Capacity
from hybridkv.policies import make_policy

from capacity_helpers import (
    C,
    FULL,
    ONE,
    SLIDING,
    STATE,
    TINY,
    Sim,
    make_layout,
)

pytestmark = pytest.mark.fast


def test_group_aware_keeps_shared_prefix_and_newest_end_state():
    """Two requests share a prefix, then diverge; the budget fits one branch.

    Full attention + state, every chunk 100 bytes, budget 700 (7 chunks).
    A = 0 1 2 3 and B = 0 1 5 6, each with a 5-token tail (the hit point is
    the end, 64 tokens). A stores its spine and its end state (admitted), then
    spare states into free space, deepest first: 48 and 32 fit, 16 does not.
    B hits 32 tokens (spine 0 1 plus A's spare state at 32, now a checkpoint)
    and needs 300 bytes for its branch: the older branch's deeper chunks go
    (its spare state at 48 first: within a chunk of A's end it goes with its
    hit point, by utility), and B's end state and its spare state at 48 are
    stored. A third, unrelated request then needs 200 bytes: the least useful
    hit points go (the fork at 32, older than B's end, and B's spare point at
    48); the shared ancestors 0 and 0 1 stay because B's end still needs them.
    """
    layout = make_layout((FULL, STATE), pages=TINY, layers=ONE)
    sim = Sim(layout, "group_aware", 700)
    a, b = (0, 1, 2, 3), (0, 1, 5, 6)
    sim.name_all(a, b, (7,))

    hit, plan, evicted = sim.request(a)
    assert hit == 0 and not evicted
    assert sim.names(c.key for c in plan.admitted) == {
        "F0", "F01", "F012", "F0123", "S0123", "S012", "S01"}
    assert sim.names(c.key for c in plan.skipped) == {"S0"}  # spare, deepest first: no room
    assert {sim.names([c.key]).pop(): sim.index.get(c.key).spare for c in plan.admitted
            if c.group == 1} == {"S0123": False, "S012": True, "S01": True}

    hit, plan, evicted = sim.request(b)
    assert hit == 32  # spine 0 1 and the state at 32
    assert sim.names(evicted) == {"F012", "F0123", "S012", "S0123"}
    assert sim.stored() == {"F0", "F01", "S01", "F015", "F0156", "S0156", "S015"}
    assert sim.index.get(sim.keys(b)[1][2]).spare and not plan.skipped

    hit, plan, evicted = sim.request((7,))
    assert hit == 0 and sim.names(c.key for c in plan.admitted) == {"F7", "S7"}
    assert sim.names(evicted) == {"S01", "S015"}
    assert sim.stored() == {"F0", "F01", "F015", "F0156", "S0156", "F7", "S7"}
    assert sim.index.bytes_used == 700


@pytest.mark.parametrize("kinds", [(FULL, SLIDING, STATE), (FULL, STATE), (FULL, SLIDING)])
def test_removing_a_spine_chunk_reclaims_every_deeper_chunk_on_its_prefix(kinds):
    layout = make_layout(kinds, window=32, pages=TINY, layers=ONE)
    sim = Sim(layout, "group_aware", None)
    a, b, other = (0, 1, 2, 3), (0, 1, 4), (2, 2)
    sim.name_all(a, b, other)
    # every chunk of every group of three prompts is stored (two share the prefix 0 1)
    for ids in (a, b, other):
        for gi, ks in sim.keys(ids).items():
            for i, k in enumerate(ks):
                if k not in sim.index:
                    sim.index.add(k, group=gi, position=(i + 1) * C, size=100,
                                  parent=ks[i - 1] if i else None)
    before = sim.stored()
    pinned = sim.keys(b)[0][2]  # F014, being loaded
    sim.index.pin(pinned)

    tags = [{FULL: "F", SLIDING: "W", STATE: "S"}[k] for k in kinds]
    every = {t + p for t in tags for p in ("0", "01", "012", "0123", "014", "2", "22")}
    assert before == every

    removed = sim.names(sim.cap.remove([sim.keys(a)[0][1]]))  # F01

    # every deeper chunk of every group on prefix 0 1 (both branches) goes ...
    assert removed == {t + p for t in tags for p in ("01", "012", "0123", "014")} - {"F014"}
    # ... except a pinned one (being loaded: never removed, not even as an orphan);
    # the ancestor 0 and the unrelated prefix 2 2 stay
    assert sim.stored() == {"F014"} | {t + p for t in tags for p in ("0", "2", "22")}

    # a group-agnostic LRU removes only what it is told: the rest is stranded
    lru = Capacity(sim.index, make_policy("lru", layout), None)
    assert sim.names(lru.remove([sim.keys(other)[0][0]])) == {"F2"}
    assert "F22" in sim.stored()


@pytest.mark.parametrize("policy", ["group_aware", "lru"])
def test_a_second_question_on_a_document_hits_a_chunk_short_of_the_first_end(policy):
    """Long-document questions: the second question diverges inside the first one's last
    chunk, so it resumes a chunk short of the first one's end, where only spare chunks
    (the state there, the window chunk just outside the end's window) serve it. They are
    stored before the far spares (deepest first) and are not expendable: later requests
    that need room for their checkpoints retire older hit points first, so the second
    question hits as it does under a group-agnostic LRU (it got 0 tokens when every spare
    chunk went before any checkpoint)."""
    layout = make_layout((FULL, SLIDING, STATE), window=32, pages=TINY, layers=ONE)
    doc, q1, q2 = (0, 1, 2, 3, 4, 5), (6,), (7,)
    older = [(30 + i,) for i in range(4)]
    fillers = [(10 + i,) for i in range(3)]
    sim = Sim(layout, policy, 3000)
    sim.name_all(doc + q1, doc + q2, *older, *fillers)
    for ids in (*older, doc + q1, *fillers):  # the fillers need room: eviction runs
        sim.request(ids)
    assert sim.names(k for ids in older for ks in sim.keys(ids).values() for k in ks) \
        - sim.stored()  # some older chunks went
    hit, _, _ = sim.request(doc + q2)
    assert hit == len(doc) * C
