"""The reference (future-aware) policy: servable hits only, within budget, never below the others."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridkv.sim.layouts import SIM_MODELS
from hybridkv.sim.reference import ReferencePolicy
from hybridkv.sim.replay import replay, request_keys, working_set_bytes
from hybridkv.sim.trace_builder import Builder
from hybridkv.sim.traces import Request, Trace

pytestmark = pytest.mark.fast

MODELS = list(SIM_MODELS)
OTHERS = ("group_aware", "lru", "watermark")
C = 256  # the simulated chunk


def build(prompts: list[list[tuple[int, int]]], block_tokens: int = 64) -> Trace:
    """A trace of prompts given as (text id, tokens) segments: equal ids mean equal text."""
    b = Builder(block_tokens, seed=0)
    segments: dict[int, tuple[int, int]] = {}
    for t, prompt in enumerate(prompts):
        segs = [segments.setdefault(sid, b.fresh(n)) for sid, n in prompt]
        b.add(segs, t, 10, f"s{t}")
    return b.trace("tiny")


def chats() -> Trace:
    """Three chats over one system prompt, turns interleaved (each turn extends the last)."""
    prompts, convs = [], {0: [(0, 600)], 1: [(0, 600)], 2: [(0, 600)]}
    sid = 10
    for turn in range(4):
        for c in (0, 1, 2, 0) if turn % 2 else (2, 1, 0):
            convs[c] = convs[c] + [(sid, 300 + 97 * c)]
            sid += 1
            prompts.append(list(convs[c]))
    return build(prompts)


def documents() -> Trace:
    """Two documents asked questions in turn, a third document asked once."""
    prompts = []
    for q in range(6):
        prompts.append([(1, 2000), (100 + q, 40)])
        prompts.append([(2, 3000), (200 + q, 60)])
        if q == 2:
            prompts.append([(3, 2500), (300, 30)])
    return build(prompts)


def agents() -> Trace:
    """A root context and branches from it, each branch continued once."""
    root = [(1, 1500)]
    prompts = [root]
    for k in range(3):
        prompts.append(root + [(10 + k, 400)])
    for k in range(3):
        prompts.append(root + [(10 + k, 400), (20 + k, 300)])
    prompts.append(root + [(10, 400)])
    return build(prompts)


TINY = {"chats": chats, "documents": documents, "agents": agents}


@pytest.mark.parametrize("trace_name", TINY)
@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.25, 0.5, 1.0])
def test_reference_is_servable_within_budget_and_not_below_the_others(trace_name, model_name,
                                                                      fraction):
    trace, model = TINY[trace_name](), SIM_MODELS[model_name]
    budget = int(working_set_bytes(trace, model) * fraction)
    ref = replay(trace, model, "reference", budget, check=True)
    assert ref.peak_bytes <= budget
    for policy in OTHERS:
        other = replay(trace, model, policy, budget)
        assert ref.hit_tokens >= other.hit_tokens, (policy, ref.hit_tokens, other.hit_tokens)
    unbounded = replay(trace, model, "unbounded", None)
    assert ref.hit_tokens <= unbounded.hit_tokens
    if fraction == 1.0:
        assert ref.hit_tokens == unbounded.hit_tokens


def test_reference_stores_only_what_a_later_request_loads():
    # no prompt shares a chunk with another: nothing is worth storing
    trace = build([[(i, 1000)] for i in range(5)])
    model = SIM_MODELS["jamba_mini"]
    r = replay(trace, model, "reference", working_set_bytes(trace, model), check=True)
    assert r.bytes_written == 0 and r.hit_tokens == 0
    assert r.stores_rejected == sum(len(k) for req in trace.requests
                                    for k in request_keys(req, model, trace.block_tokens))
    # a repeated prompt: only what its hit loads is written (the spine up to the hit, the
    # state at the hit), not the states at every chunk
    trace = build([[(1, 1100)], [(1, 1100)]])
    r = replay(trace, model, "reference", None, check=True)
    full, state = model.layout.groups[0], model.layout.groups[1]
    assert r.hit_tokens == 4 * C
    assert r.bytes_written == 4 * full.chunk_bytes + 7 * state.chunk_bytes


def test_reference_keeps_the_sooner_of_two_prefixes():
    # A and B alternate; the budget holds one of them: Belady keeps the one needed next
    a, b = [(1, 2000)], [(2, 2000)]
    trace = build([a, b, a, a, b, a, b])
    model = SIM_MODELS["qwen3_next_80b"]
    one = working_set_bytes(build([a]), model)
    r = replay(trace, model, "reference", int(one * 1.2), check=True)
    lru = replay(trace, model, "lru", int(one * 1.2))
    assert r.hit_tokens > lru.hit_tokens
    assert r.hit_tokens >= 3 * (2000 - 2000 % C)


def test_advance_must_move_forward():
    trace = chats()
    model = SIM_MODELS["gemma3_27b"]
    keys = [request_keys(r, model, trace.block_tokens) for r in trace.requests]
    pol = ReferencePolicy(model.layout, keys, [r.input_length for r in trace.requests], None)
    pol.advance(0)
    with pytest.raises(ValueError, match="advance"):
        pol.advance(0)
    with pytest.raises(ValueError, match="prompt length"):
        ReferencePolicy(model.layout, keys, [], None)


@st.composite
def random_traces(draw):
    """Prompts built from a few shared texts: repeats, extensions, forks."""
    prompts: list[list[tuple[int, int]]] = []
    for _ in range(draw(st.integers(1, 14))):
        if prompts and draw(st.booleans()):
            base = draw(st.sampled_from(prompts))
            keep = draw(st.integers(1, len(base)))
            prompt = base[:keep] + draw(st.lists(
                st.tuples(st.integers(0, 12), st.integers(1, 900)), max_size=2))
        else:
            prompt = draw(st.lists(st.tuples(st.integers(0, 12), st.integers(1, 1500)),
                                   min_size=1, max_size=3))
        prompts.append(prompt)
    # one length per text id, whatever the draw said
    length = {}
    return build([[(sid, length.setdefault(sid, n)) for sid, n in p] for p in prompts],
                 block_tokens=draw(st.sampled_from([64, 256, 512])))


@settings(max_examples=60, deadline=None)
@given(random_traces(), st.sampled_from(MODELS), st.floats(0.02, 1.0))
def test_reference_invariants_on_random_traces(trace, model_name, fraction):
    model = SIM_MODELS[model_name]
    budget = int(working_set_bytes(trace, model) * fraction)
    r = replay(trace, model, "reference", budget, check=True)  # servable hits, budget held
    assert r.peak_bytes <= budget
    assert r.hit_tokens <= replay(trace, model, "unbounded", None).hit_tokens


def test_tiny_traces_have_reuse():
    # the hand-built traces exercise the budget: the unbounded store has hits on each
    for make in TINY.values():
        trace = make()
        assert all(isinstance(r, Request) for r in trace.requests)
        assert replay(trace, SIM_MODELS["jamba_mini"], "unbounded", None).hit_tokens > 0
