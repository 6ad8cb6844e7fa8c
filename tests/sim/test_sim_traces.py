"""Trace generators and JSONL traces: prefix ids, determinism, shapes, round trips, errors."""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridkv.sim.traces import (
    GENERATORS,
    Request,
    Trace,
    agentic_branching,
    load_jsonl,
    make_trace,
    prefix_stats,
    save_jsonl,
    token_hash_ids,
    working_set_tokens,
)

# marked test by test, not by pytestmark: one test is slow (tests/conftest.py)

NAMES = ["multi_turn", "shared_system", "agentic", "document_qa"]


@pytest.fixture(scope="module")
def quick() -> dict[str, Trace]:
    return {name: make_trace(name) for name in NAMES}


def check_prefix_ids(trace: Trace) -> None:
    """Each id has one parent (the id before it, None at position 0), so equal ids mean equal
    prefixes; a partial last block's id is never followed by another block."""
    parent_of: dict[int, int | None] = {}
    partial = set()
    for n, r in enumerate(trace.requests):
        parent = None
        for pos, block_id in enumerate(r.hash_ids):
            seen = parent_of.setdefault(block_id, parent)
            assert seen == parent, f"request {n}: id {block_id} at {pos} after two prefixes"
            parent = block_id
        if r.input_length % trace.block_tokens:
            partial.add(r.hash_ids[-1])
    parents = set(parent_of.values())
    assert not partial & parents, "a partial block's id is followed by another block"


def by_session(trace: Trace) -> dict[str, list[Request]]:
    sessions = defaultdict(list)
    for r in trace.requests:
        sessions[r.session].append(r)
    return sessions


def full_blocks(r: Request, block_tokens: int) -> tuple[int, ...]:
    return r.hash_ids[: r.input_length // block_tokens]


# --------------------------------------------------------------------------- generators

@pytest.mark.fast
def test_registry_and_unknown_name():
    assert sorted(GENERATORS) == sorted(NAMES)
    with pytest.raises(ValueError, match="multi_turn.*shared_system.*agentic.*document_qa"):
        make_trace("nope")
    with pytest.raises(ValueError, match="quick"):
        make_trace("agentic", scale="huge")


@pytest.mark.fast
@pytest.mark.parametrize("name", NAMES)
def test_quick_trace_shape(quick, name):
    trace = quick[name]
    B = trace.block_tokens
    assert (trace.name, B) == (name, 64)
    assert 150 <= len(trace.requests) <= 300
    assert sum(r.input_length for r in trace.requests) < 1_500_000
    assert any(r.input_length % B for r in trace.requests)
    for r in trace.requests:
        assert len(r.hash_ids) == math.ceil(r.input_length / B)
        assert r.input_length > 0 and r.output_length > 0
    times = [r.timestamp for r in trace.requests]
    assert times == sorted(times) and times[-1] > times[0]


@pytest.mark.fast
@pytest.mark.parametrize("name", NAMES)
def test_full_scale_is_3_to_5_times_quick(quick, name):
    full = make_trace(name, scale="full")
    assert 3 * len(quick[name].requests) <= len(full.requests) <= 5 * len(quick[name].requests)


@pytest.fixture(scope="module")
def large_chat() -> Trace:
    return make_trace("multi_turn", scale="large")


@pytest.mark.fast
def test_large_multi_turn_is_production_sized(large_chat):
    s = prefix_stats(large_chat)
    assert 11_000 <= s["requests"] <= 13_000
    assert 130e6 <= s["prompt_tokens"] <= 160e6  # ~12K tokens per prompt, like Mooncake's
    assert s["reused_fraction"] > 0.8  # each turn resends the conversation so far
    times = [r.timestamp for r in large_chat.requests]
    assert times == sorted(times)


@pytest.mark.fast
def test_large_scale_is_deterministic(large_chat):
    again = make_trace("multi_turn", scale="large")
    assert again == large_chat
    assert make_trace("multi_turn", scale="large", seed=1).requests[:50] != large_chat.requests[:50]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_large_scale_of_every_generator(name):
    trace = make_trace(name, scale="large")
    assert 10_000 <= len(trace.requests) <= 14_000
    check_prefix_ids(trace)


@pytest.mark.fast
def test_extending_a_hashed_prompt_gives_the_ids_of_hashing_it_whole():
    # the builder resumes from a prompt hashed before; the ids must not depend on it
    from hybridkv.sim.trace_builder import Builder

    b = Builder(64, seed=0)
    segs = [b.fresh(n) for n in (100, 64, 37, 300, 1, 128)]
    resumed = [b.hash_ids(segs[:k]) for k in range(1, len(segs) + 1)]  # each from the last
    b._hashed.clear()
    assert [b.hash_ids(segs[:k]) for k in range(len(segs), 0, -1)] == resumed[::-1]


@pytest.mark.fast
@pytest.mark.parametrize("name", NAMES)
def test_deterministic_per_seed(quick, name):
    assert make_trace(name) == quick[name]
    assert make_trace(name, seed=1) == make_trace(name, seed=1)
    assert make_trace(name, seed=1) != quick[name]


@pytest.mark.fast
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("block_tokens", [64, 16])
def test_prefix_ids(quick, name, block_tokens):
    trace = quick[name] if block_tokens == 64 else make_trace(name, block_tokens=block_tokens)
    for r in trace.requests:
        assert len(r.hash_ids) == math.ceil(r.input_length / block_tokens)
    check_prefix_ids(trace)


@pytest.mark.fast
def test_prefix_id_check_catches_an_id_reused_after_another_prefix():
    bad = Trace(name="bad", block_tokens=4, requests=[
        Request(hash_ids=(1, 2), input_length=8),
        Request(hash_ids=(3, 2), input_length=8),
    ])
    with pytest.raises(AssertionError, match="two prefixes"):
        check_prefix_ids(bad)


@pytest.mark.fast
def test_multi_turn_each_turn_extends_the_previous_prompt(quick):
    trace = quick["multi_turn"]
    B = trace.block_tokens
    chats = by_session(trace)
    assert len(chats) == 32
    for turns in chats.values():
        assert 4 <= len(turns) <= 10
        for prev, turn in zip(turns, turns[1:]):
            k = prev.input_length // B
            assert turn.hash_ids[:k] == prev.hash_ids[:k]
            assert turn.input_length > prev.input_length + prev.output_length  # + a new message
            if prev.input_length % B:  # the partial block was filled in by the answer
                assert turn.hash_ids[k] != prev.hash_ids[k]
    # a few shared system prompts, and chats overlap in time
    assert 2 <= len({turns[0].hash_ids[0] for turns in chats.values()}) <= 4
    spans = sorted((turns[0].timestamp, turns[-1].timestamp) for turns in chats.values())
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))


@pytest.mark.fast
def test_shared_system_prompts_are_popular_and_suffixes_unique(quick):
    trace = quick["shared_system"]
    counts = defaultdict(int)
    for r in trace.requests:
        counts[r.hash_ids[0]] += 1
    assert 2 <= len(counts) <= 6
    assert max(counts.values()) >= 2 * min(counts.values())  # Zipf-like, not uniform
    assert len({r.hash_ids[-1] for r in trace.requests}) == len(trace.requests)


@pytest.mark.fast
@pytest.mark.parametrize("small", [False, True])
def test_agentic_siblings_share_parent_prompt_then_diverge(quick, small):
    if small:
        trace = agentic_branching(trees=3, depth=4, fanout=4, block_tokens=16, seed=7)
    else:
        trace = quick["agentic"]
    B = trace.block_tokens
    families = 0
    for run in by_session(trace).values():
        children = defaultdict(list)
        for i, r in enumerate(run):
            # the parent is the longest earlier request of the run whose prompt is a prefix of r's
            # (steps are longer than a block, so a non-ancestor always differs in a full block)
            ancestors = [p for p in run[:i] if p.input_length < r.input_length
                         and r.hash_ids[: len(full_blocks(p, B))] == full_blocks(p, B)]
            assert bool(ancestors) == (i > 0)
            if ancestors:
                children[max(ancestors, key=lambda p: p.input_length)].append(r)
        for parent, kids in children.items():
            k = parent.input_length // B
            assert all(kid.hash_ids[:k] == parent.hash_ids[:k] for kid in kids)
            assert len({kid.hash_ids[k] for kid in kids}) == len(kids)  # diverge right after
            families += len(kids) > 1
    assert families >= 3


@pytest.mark.fast
def test_document_qa_questions_share_documents_and_interleave(quick):
    trace = quick["document_qa"]
    docs = by_session(trace)
    for questions in docs.values():
        shared = next(i for i, ids in enumerate(zip(*(q.hash_ids for q in questions)))
                      if len(set(ids)) > 1)
        assert shared * trace.block_tokens > 3000 - trace.block_tokens  # the whole document
        assert len({q.hash_ids[-1] for q in questions}) == len(questions)
    switches = sum(a.session != b.session for a, b in zip(trace.requests, trace.requests[1:]))
    assert switches > 2 * len(docs)


@pytest.mark.fast
def test_stats():
    trace = Trace(name="t", block_tokens=4, requests=[
        Request(hash_ids=(1, 2), input_length=7),
        Request(hash_ids=(1, 2, 3), input_length=12),
        Request(hash_ids=(4,), input_length=2),
    ])
    assert working_set_tokens(trace) == 4 * 4
    assert prefix_stats(trace) == {"requests": 3, "prompt_tokens": 21, "prompt_blocks": 6,
                                   "distinct_blocks": 4, "reused_fraction": pytest.approx(2 / 6)}
    assert prefix_stats(Trace(name="e", block_tokens=4, requests=[]))["reused_fraction"] == 0.0


# --------------------------------------------------------------------------- JSONL

@pytest.mark.fast
@pytest.mark.parametrize("name", NAMES)
def test_jsonl_round_trip(quick, tmp_path, name):
    trace = quick[name]
    path = save_jsonl(trace, tmp_path / f"{name}.jsonl")
    loaded = load_jsonl(path, block_tokens=trace.block_tokens)
    assert loaded.requests == trace.requests
    assert (loaded.name, loaded.block_tokens) == (name, trace.block_tokens)


@pytest.mark.fast
def test_saved_lines_are_mooncake_objects(quick, tmp_path):
    path = save_jsonl(quick["agentic"], tmp_path / "a.jsonl")
    lines = path.read_text().splitlines()
    assert len(lines) == len(quick["agentic"].requests)
    first = json.loads(lines[0])
    assert set(first) == {"timestamp", "input_length", "output_length", "hash_ids", "session"}
    assert isinstance(first["timestamp"], int)
    assert first["timestamp"] == round(quick["agentic"].requests[0].timestamp * 1000)


@pytest.mark.fast
def test_load_mooncake_lines_with_optional_fields(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"timestamp": 1500, "input_length": 1025, "output_length": 7,'
                    ' "hash_ids": [0, 1, 2]}\n'
                    "\n"
                    '{"input_length": 512, "hash_ids": [0], "extra": "ignored"}\n'
                    '{"timestamp": 2000.5, "input_length": 1, "hash_ids": [9], "session": "s"}\n')
    trace = load_jsonl(path)
    assert (trace.name, trace.block_tokens) == ("m", 512)
    assert trace.requests == [
        Request(hash_ids=(0, 1, 2), input_length=1025, output_length=7, timestamp=1.5),
        Request(hash_ids=(0,), input_length=512, timestamp=1.5),
        Request(hash_ids=(9,), input_length=1, timestamp=2.0005, session="s"),
    ]
    assert load_jsonl(path, name="x").name == "x"


@pytest.mark.fast
def test_load_token_lines(tmp_path):
    a = list(range(100))
    b = a[:70] + [7] * 30
    path = tmp_path / "tok.jsonl"
    path.write_text(json.dumps({"tokens": a, "timestamp": 0, "output_length": 5}) + "\n"
                    + json.dumps({"tokens": b, "timestamp": 10, "input_length": 100}) + "\n"
                    + json.dumps({"tokens": a[:64], "timestamp": 10}) + "\n")
    ra, rb, rprefix = load_jsonl(path, block_tokens=16).requests
    assert (ra.input_length, ra.output_length, rb.timestamp) == (100, 5, 0.01)
    assert ra.hash_ids == token_hash_ids(a, 16) and len(ra.hash_ids) == 7
    assert ra.hash_ids[:4] == rb.hash_ids[:4]  # tokens [0, 64) equal
    assert all(x != y for x, y in zip(ra.hash_ids[4:], rb.hash_ids[4:]))  # diverged at token 70
    assert rprefix.hash_ids == ra.hash_ids[:4]
    check_prefix_ids(Trace(name="tok", block_tokens=16, requests=[ra, rb, rprefix]))


@pytest.mark.fast
@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=40), st.integers(0, 40),
       st.lists(st.integers(0, 3), max_size=20), st.integers(1, 8))
def test_token_ids_equal_exactly_when_prefixes_equal(a, cut, tail, block):
    b = a[:cut] + tail
    ids_a, ids_b = token_hash_ids(a, block), token_hash_ids(b, block)
    assert len(ids_a) == math.ceil(len(a) / block)
    for i, (x, y) in enumerate(zip(ids_a, ids_b)):
        end = (i + 1) * block
        assert (x == y) == (a[:end] == b[:end])


GOOD = '{"timestamp": 5, "input_length": 3, "hash_ids": [1]}'


@pytest.mark.fast
@pytest.mark.parametrize("bad, why", [
    ('{"timestamp": 6, "hash_ids": [1]}', "missing field 'input_length'"),
    ('{"timestamp": 6, "input_length": 3}', "missing field 'hash_ids'"),
    ('{"timestamp": 6, "input_length": 9, "hash_ids": [1, 2]}', "2 hash_ids, expected 3"),
    ('{"timestamp": 6, "input_length": -1, "hash_ids": []}', "$.input_length"),
    ('{"timestamp": 6, "input_length": 3, "output_length": -2, "hash_ids": [1]}',
     "$.output_length"),
    ('{"timestamp": 6, "input_length": 3, "hash_ids": ["a"]}', "$.hash_ids[0]"),
    ('{"timestamp": 6, "input_length": 3, "hash_ids": [1.5]}', "$.hash_ids[0]"),
    ('{"timestamp": 6, "input_length": 3, "hash_ids": [true]}', "$.hash_ids[0]"),
    ('{"timestamp": 6, "tokens": [1, 2, 3], "hash_ids": [1]}', "both"),
    ('{"timestamp": 6, "tokens": [1, "x"]}', "$.tokens[1]"),
    ('{"timestamp": 6, "tokens": [1, 2], "input_length": 3}', "input_length 3 != 2 tokens"),
    ('{"timestamp": 4, "input_length": 3, "hash_ids": [1]}', "timestamp 4"),
    ('{"timestamp": -1, "input_length": 3, "hash_ids": [1]}', "$.timestamp"),
    ('[1, 2]', "object"),
    ("not json", ""),
])
def test_bad_line_names_line_and_problem(tmp_path, bad, why):
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{GOOD}\n\n{bad}\n{GOOD}\n")
    with pytest.raises(ValueError, match=r"line 3: .*" + re.escape(why)):
        load_jsonl(path, block_tokens=4)
