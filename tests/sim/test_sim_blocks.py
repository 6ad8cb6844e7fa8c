"""Trace block sizes: blocks that divide the chunk or are a multiple of it replay as they are."""

from __future__ import annotations

import pytest

from hybridkv.sim.layouts import SIM_MODELS
from hybridkv.sim.replay import replay, request_keys, working_set_bytes
from hybridkv.sim.traces import Request, Trace, make_trace

pytestmark = pytest.mark.fast

MODEL = SIM_MODELS["gemma3_27b"]
C = 256


def reexpress(trace: Trace, block_tokens: int) -> Trace:
    """The same prompts in smaller blocks: block b's j-th piece gets the id of (b, j)."""
    per = trace.block_tokens // block_tokens
    assert per * block_tokens == trace.block_tokens
    ids: dict[tuple[int, int], int] = {}
    requests = []
    for r in trace.requests:
        new = []
        for n, b in enumerate(r.hash_ids):
            tokens = min(trace.block_tokens, r.input_length - n * trace.block_tokens)
            new += [ids.setdefault((b, j), len(ids)) for j in range(-(-tokens // block_tokens))]
        requests.append(Request(hash_ids=tuple(new), input_length=r.input_length,
                                timestamp=r.timestamp, session=r.session))
    return Trace(name=trace.name, block_tokens=block_tokens, requests=requests)


def test_large_blocks_give_one_key_per_complete_chunk():
    a = Request(hash_ids=(1, 2, 3), input_length=2 * 512 + 300)  # last block partial
    b = Request(hash_ids=(1, 2, 4), input_length=3 * 512)
    c = Request(hash_ids=(5, 6), input_length=1024)
    ka, kb, kc = (request_keys(r, MODEL, 512) for r in (a, b, c))
    for keys, r in ((ka, a), (kb, b), (kc, c)):
        assert [len(k) for k in keys] == [r.input_length // C] * len(MODEL.layout.groups)
        assert len(set(keys[0])) == len(keys[0])
    full_a, full_b, full_c = ka[0], kb[0], kc[0]
    assert len(full_a) == 5  # the partial block gives its one complete chunk
    assert full_a[:4] == full_b[:4]  # equal prefixes (blocks 1, 2)
    assert full_a[4] != full_b[4]  # block 3 vs block 4
    assert not set(full_c) & set(full_a)  # a different first block: a different prefix
    assert ka[1][:4] == kb[1][:4] and ka[1][0] != ka[0][0]  # per group


@pytest.mark.parametrize("block_tokens", [100, 384, 3])
def test_block_neither_divisor_nor_multiple_is_refused(block_tokens):
    r = Request(hash_ids=tuple(range(-(-1000 // block_tokens))), input_length=1000)
    with pytest.raises(ValueError, match=f"{block_tokens}-token blocks"):
        request_keys(r, MODEL, block_tokens)


@pytest.mark.parametrize("name", ["multi_turn", "document_qa"])
def test_hit_rates_do_not_depend_on_how_the_blocks_are_cut(name):
    big = make_trace(name, block_tokens=512)
    big = Trace(name=big.name, block_tokens=512, requests=big.requests[:90])
    traces = [big, reexpress(big, 256), reexpress(big, 64)]
    for model in (MODEL, SIM_MODELS["jamba_mini"]):
        ws = {working_set_bytes(t, model) for t in traces}
        assert len(ws) == 1
        budget = int(ws.pop() * 0.25)
        for policy in ("lru", "group_aware", "reference", "unbounded"):
            hits = [replay(t, model, policy, budget).hit_tokens for t in traces]
            assert hits[0] > 0 and len(set(hits)) == 1, (model.name, policy, hits)


def test_1024_token_blocks_match_64_token_blocks():
    big = make_trace("agentic", block_tokens=1024)
    big = Trace(name=big.name, block_tokens=1024, requests=big.requests[:60])
    small = reexpress(big, 64)
    model = SIM_MODELS["qwen3_next_80b"]
    budget = int(working_set_bytes(big, model) * 0.1)
    assert working_set_bytes(small, model) == working_set_bytes(big, model)
    for policy in ("lru", "group_aware", "reference"):
        assert (replay(big, model, policy, budget, check=True).hit_tokens
                == replay(small, model, policy, budget).hit_tokens)
