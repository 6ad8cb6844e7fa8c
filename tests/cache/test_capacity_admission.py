"""Capacity admission: which chunks of a request are stored, which are spare.

Hand-built cases with exact sizes through ``capacity_helpers.Sim`` (or the real
manager): only the state at a request's end is a checkpoint, the others are
spare (stored into free space only, deepest first, and the first to go); chunks
past a full-attention chunk that did not fit are skipped; a spare chunk replaces
a dead or far spare one, never a checkpoint. Names: F / W / S (full, window,
state) + the chunk ids of the prefix.
"""

from __future__ import annotations

import pytest
from vllm.v1.kv_offload.base import ReqContext

from hybridkv.policies import Admission, Candidate, RequestView

from capacity_helpers import (
    C,
    FULL,
    ONE,
    SLIDING,
    STATE,
    TINY,
    Sim,
    make_layout,
    make_manager,
    request_context,
    request_keys,
)

pytestmark = pytest.mark.fast


def test_non_checkpoint_state_is_spare_and_goes_before_checkpoints():
    layout = make_layout((FULL, STATE), pages=TINY, layers=ONE)
    ids = (0, 1, 2, 3)
    sim = Sim(layout, "group_aware", 500)
    sim.name_all(ids, (5,), (6, 6))
    keys = sim.keys(ids)
    batch = [Candidate(k, gi, (i + 1) * C, 100, ks[i - 1] if i else None)
             for gi, ks in keys.items() for i, k in enumerate(ks)]
    view = RequestView("r", {c.key: c.position for c in batch}, len(ids) * C + 5)
    verdicts = dict(zip((sim.names([c.key]).pop() for c in batch),
                        sim.cap.policy.admit(batch, view, sim.index)))
    # only the state at the request end (the likely hit point) is a checkpoint
    assert verdicts == {"F0": Admission.ADMIT, "F01": Admission.ADMIT, "F012": Admission.ADMIT,
                        "F0123": Admission.ADMIT, "S0123": Admission.ADMIT,
                        "S0": Admission.SPARE, "S01": Admission.SPARE, "S012": Admission.SPARE}

    # the budget fits exactly the admitted chunks: spare states are skipped, nothing evicted
    _, plan, evicted = sim.request(ids)
    assert not evicted and sim.names(c.key for c in plan.skipped) == {"S0", "S01", "S012"}
    assert sim.stored() == {"F0", "F01", "F012", "F0123", "S0123"}
    # spare states alone never evict, even with the disk full
    spare = [c for c in batch if c.group == 1 and c.position < 64]
    plan = sim.cap.plan_store(spare, view)
    assert not plan.evicted and not plan.admitted and len(plan.skipped) == 3

    # with room to spare they are stored, flagged spare ...
    sim = Sim(layout, "group_aware", 700)
    sim.name_all(ids, (5,), (6, 6))
    sim.request(ids)
    assert sim.stored() == {"F0", "F01", "F012", "F0123", "S0123", "S012", "S01"}
    assert [sim.index.get(k).spare for k in sim.keys(ids)[1][1:3]] == [True, True]
    # ... and are the first to go: a request needing 200 bytes takes both, not the checkpoint
    # (the one at 16 as expendable, the one a chunk short of the end as the least useful point)
    _, plan, evicted = sim.request((5,))
    assert sim.names(evicted) == {"S01", "S012"}
    assert sim.stored() == {"F0", "F01", "F012", "F0123", "S0123", "F5", "S5"}
    # a checkpoint retired takes its whole spine once no other checkpoint needs it (in a
    # state model a spine without a state serves no hit); the newer checkpoint stays
    _, plan, evicted = sim.request((6, 6))
    assert sim.names(evicted) == {"F0", "F01", "F012", "F0123", "S0123"}
    assert sim.stored() == {"F5", "S5", "F6", "F66", "S6", "S66"}


def test_chunks_past_a_spine_chunk_that_did_not_fit_are_skipped():
    """A window chunk at or past a full-attention chunk that did not fit could never be hit."""
    layout = make_layout((FULL, SLIDING), pages={FULL: 100, SLIDING: 50}, layers=ONE)
    sim = Sim(layout, "group_aware", 220)
    sim.name_all((0, 1))
    hit, plan, evicted = sim.request((0, 1))  # F0 + W0 = 150 bytes; F01 needs 100 more
    assert hit == 0 and not evicted
    assert sim.names(c.key for c in plan.admitted) == {"F0", "W0"}
    # W01 (50 bytes) would fit, but the spine breaks before it
    assert sim.names(c.key for c in plan.skipped) == {"F01", "W01"}
    assert sim.stored() == {"F0", "W0"}


def test_manager_uses_the_prompt_length_for_chunk_aligned_repeats(tmp_path):
    """A prompt of exactly two chunks: a repeat resumes at one chunk (its last token is
    recomputed), so the state there is a checkpoint, not a spare, once the connector
    told the manager the prompt length."""
    layout = make_layout((FULL, STATE))
    keys = request_keys(layout, (0, 1))

    def offer(m, name):
        ctx = request_context(name, keys)
        m.prepare_store([*keys[0], *keys[1]], ctx)
        return {i: m.index.get_any(k).spare for i, k in enumerate(keys[1])}

    told = make_manager(tmp_path / "told", layout)
    told.note_prompt_tokens("r", 2 * C)
    assert offer(told, "r") == {0: False, 1: False}
    untold = make_manager(tmp_path / "untold", layout)
    assert offer(untold, "r") == {0: True, 1: False}
    told.on_request_finished(ReqContext(req_id="r"))
    assert told.cache.prompt_tokens("r") is None  # forgotten with the request


def test_a_spare_chunk_replaces_far_spare_ones_never_a_checkpoint():
    """A full disk still takes a spare chunk in place of a dead one or of a spare one far
    from its request's end (widest gap first), never a checkpoint, never a spare chunk
    within a chunk of a checkpoint (a follow-up that changes only the tail resumes there)."""
    layout = make_layout((FULL, STATE), pages=TINY, layers=ONE)
    ids, other = (0, 1, 2, 3, 4), (7, 8, 9)
    sim = Sim(layout, "group_aware", 900)
    sim.name_all(ids, other)
    _, plan, _ = sim.request(ids)
    # spare states go in deepest first: 64, 48 and 32 fit, 16 does not
    assert sim.stored() == {"F0", "F01", "F012", "F0123", "F01234", "S01234",
                            "S0123", "S012", "S01"}
    assert sim.names(c.key for c in plan.skipped) == {"S0"}

    keys = sim.keys(other)  # another request offers only its state at 16 (not its end: spare)
    s7 = Candidate(keys[1][0], 1, C, 100, None)
    view = RequestView("other", {k: (i + 1) * C for ks in keys.values()
                                 for i, k in enumerate(ks)}, len(other) * C + 5)
    assert sim.cap.policy.admit([s7], view, sim.index) == [Admission.SPARE]
    sim.index.touch(sim.keys(ids)[0][0])  # recency does not save the far spare state at 32
    plan = sim.cap.plan_store([s7], view)
    assert sim.names(c.key for c in plan.admitted) == {"S7"}
    assert sim.names(plan.evicted) == {"S01"}  # 48 tokens short of the end: the widest gap
    sim.cap.request_finished("other")

    # the budget holds the checkpoint and the spare state a chunk short of the end only:
    # nothing is expendable, the spare candidate is skipped, checkpoints stay
    for budget, kept in ((700, {"S0123"}), (600, set())):
        sim = Sim(layout, "group_aware", budget)
        sim.name_all(ids, other)
        sim.request(ids)
        assert sim.stored() == {"F0", "F01", "F012", "F0123", "F01234", "S01234"} | kept
        plan = sim.cap.plan_store([s7], view)
        assert not plan.admitted and not plan.evicted and len(plan.skipped) == 1
