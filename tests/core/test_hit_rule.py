"""The hybrid hit rule against a brute-force oracle and against vLLM's own connector code."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridkv.groups import GroupKind, GroupSpec
from hybridkv.hit_rule import load_window_chunks, servable_tokens

pytestmark = pytest.mark.fast


def _cdiv(a, b):
    return -(-a // b)


@st.composite
def scenarios(draw, uniform_chunks=True):
    chunk = draw(st.sampled_from([4, 8, 16]))
    kinds = draw(st.lists(st.sampled_from(list(GroupKind)), min_size=1, max_size=4))
    groups = []
    for i, kind in enumerate(kinds):
        c = chunk if uniform_chunks else chunk * draw(st.sampled_from([1, 2]))
        window = draw(st.integers(1, 5 * c)) if kind is GroupKind.SLIDING else None
        groups.append(GroupSpec(index=i, kind=kind, block_tokens=c, chunk_tokens=c,
                                layer_names=(f"l{i}",), page_bytes=8, window_tokens=window))
    num_tokens = draw(st.integers(1, 12 * chunk))
    computed = draw(st.integers(0, num_tokens)) // chunk * chunk
    n_chunks = num_tokens // min(g.chunk_tokens for g in groups) + 1
    present = {(g.index, j) for g in groups for j in range(n_chunks)
               if draw(st.booleans()) or draw(st.booleans())}  # 75% present
    return groups, present, num_tokens, computed


def oracle(groups, present, num_tokens, computed):
    """Largest hit every group can serve, by trying every chunk count from the top."""
    c = groups[0].chunk_tokens
    windowed = any(g.kind is not GroupKind.FULL for g in groups)
    cap = num_tokens - 1 if windowed else num_tokens
    start = computed // c

    def has(g, j):
        return j < start or (g.index, j) in present

    for k in range(min(num_tokens // c, _cdiv(cap, c)), 0, -1):
        end = min(k * c, cap)
        if end - computed < c:
            return 0
        ok = True
        for g in groups:
            if g.kind is GroupKind.FULL:
                need = range(0, k)
            elif g.kind is GroupKind.STATE:
                need = range(k - 1, k)
            else:
                need = range(max(0, k - load_window_chunks(g, end)), k)
            if not all(has(g, j) for j in need):
                ok = False
                break
        if ok:
            return end - computed
    return 0


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_matches_bruteforce_oracle(case):
    groups, present, num_tokens, computed = case
    got = servable_tokens(groups, lambda g, j: (g, j) in present, num_tokens, computed)
    assert got == oracle(groups, present, num_tokens, computed)


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_every_group_can_serve_the_hit(case):
    groups, present, num_tokens, computed = case
    got = servable_tokens(groups, lambda g, j: (g, j) in present, num_tokens, computed)
    if got == 0:
        return
    end = computed + got
    for g in groups:
        c = g.chunk_tokens
        assert got >= c
        k = _cdiv(end, c)
        start = computed // c
        if g.kind is GroupKind.FULL:
            need = range(start, k)
        elif g.kind is GroupKind.STATE:
            need = range(k - 1, k)
        else:
            need = range(max(start, k - load_window_chunks(g, end)), k)
        assert all((g.index, j) in present for j in need), (g, end)


def test_last_token_recomputed_with_window_groups():
    full = GroupSpec(index=0, kind=GroupKind.FULL, block_tokens=4, chunk_tokens=4,
                     layer_names=("a",), page_bytes=1)
    sw = GroupSpec(index=1, kind=GroupKind.SLIDING, block_tokens=4, chunk_tokens=4,
                   layer_names=("b",), page_bytes=1, window_tokens=6)
    everything = lambda g, j: True  # noqa: E731
    assert servable_tokens([full], everything, 16) == 16
    assert servable_tokens([full, sw], everything, 16) == 15
    # a missing window chunk pulls the hit back to the last window that is whole
    assert servable_tokens([full, sw], lambda g, j: not (g == 1 and j == 3), 16) == 12
    assert servable_tokens([full, sw], lambda g, j: not (g == 1 and j == 2), 16) == 8
    # a missing full-attention chunk cuts every deeper hit
    assert servable_tokens([full, sw], lambda g, j: not (g == 0 and j == 1), 16) == 4


# --------------------------------------------------------------------- vLLM's own code
vllm_sched = pytest.importorskip(
    "vllm.distributed.kv_transfer.kv_connector.v1.offloading.scheduler")


def _vllm_lookup(groups, present, num_tokens, computed):
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec, SlidingWindowSpec
    from vllm.v1.kv_offload.base import LookupResult

    S = vllm_sched.OffloadingConnectorScheduler
    configs = []
    for g in groups:
        c = g.chunk_tokens
        if g.kind is GroupKind.FULL:
            spec = FullAttentionSpec(block_size=c, num_kv_heads=1, head_size=8, dtype=torch.float16)
        elif g.kind is GroupKind.SLIDING:
            spec = SlidingWindowSpec(block_size=c, num_kv_heads=1, head_size=8,
                                     dtype=torch.float16, sliding_window=g.window_tokens)
        else:
            spec = MambaSpec(block_size=c, shapes=((4,),), dtypes=(torch.float16,))
        configs.append(SimpleNamespace(
            group_idx=g.index, tokens_per_chunk=c, tokens_per_block=c, is_eagle_group=False,
            kv_cache_spec=spec,
            sliding_window_size_in_chunks=vllm_sched.get_sliding_window_size_in_chunks(spec, c),
            load_window_size_in_chunks=lambda n, _s=spec, _c=c: vllm_sched.GroupOffloadConfig
            .load_window_size_in_chunks(SimpleNamespace(
                sliding_window_size_in_chunks=vllm_sched.get_sliding_window_size_in_chunks(_s, _c),
                kv_cache_spec=_s, tokens_per_chunk=_c), n)))
    full = tuple(i for i, g in enumerate(configs) if g.sliding_window_size_in_chunks is None)
    windowed = sorted((i for i, g in enumerate(configs) if i not in full),
                      key=lambda i: configs[i].sliding_window_size_in_chunks, reverse=True)
    keys = {(g.index, j): (g.index, j) for g in groups for j in range(num_tokens)}

    class Fake:
        _lookup_complete_chunks = S._lookup_complete_chunks
        _maximal_prefix_lookup = S._maximal_prefix_lookup
        _sliding_window_lookup = S._sliding_window_lookup

    fake = Fake()
    fake.config = SimpleNamespace(kv_group_configs=configs)
    fake._full_attention_groups = full
    fake._sliding_window_groups = tuple(windowed)
    fake._lookup_groups = full + tuple(windowed)
    fake._mamba_align_size = None
    fake._chunks_being_loaded = None
    fake._events_tracker = SimpleNamespace(record_lookup=lambda *a, **k: None)
    fake.manager = SimpleNamespace(lookup=lambda key, ctx: (
        LookupResult.HIT if key in present else LookupResult.MISS))
    req_status = SimpleNamespace(
        num_locally_computed_tokens=computed, max_load_tokens=None, req_context=None,
        req=SimpleNamespace(num_tokens=num_tokens, request_id="r"),
        group_states=[SimpleNamespace(offload_keys=[keys[(g.index, j)] for j in
                                                    range(num_tokens // g.chunk_tokens)])
                      for g in groups])
    return fake._lookup_complete_chunks(req_status)


@settings(max_examples=400, deadline=None)
@given(scenarios(uniform_chunks=False))
def test_agrees_with_vllm_connector(case):
    groups, present, num_tokens, computed = case
    mine = servable_tokens(groups, lambda g, j: (g, j) in present, num_tokens, computed)
    assert mine == _vllm_lookup(groups, present, num_tokens, computed)
