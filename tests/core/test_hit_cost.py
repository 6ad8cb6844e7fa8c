"""Hits that pay: ``HitCost`` predicts from observed steps and loads; ``CacheService.hit_pays``
refuses (and counts) a hit only with ``hit_cost_rule`` on."""

from __future__ import annotations

import math

import pytest

from hybridkv.cache import CacheService
from hybridkv.config import ConfigError, HybridKVConfig
from hybridkv.hit_cost import HitCost
from hybridkv.store.chunk_store import ChunkStore

from capacity_helpers import FULL, ONE, TINY, make_layout

pytestmark = pytest.mark.fast


def trained(step_s_per_token=1e-3, fixed=0.05, per_token=1e-4, explore_every=0) -> HitCost:
    cost = HitCost(explore_every=explore_every)
    for tokens in (256, 512, 1024):
        cost.observe_step(tokens, step_s_per_token * tokens)
        cost.observe_load(tokens, fixed + per_token * tokens)
    return cost


def test_every_hit_pays_until_both_sides_were_observed():
    cost = HitCost(explore_every=0)
    for _ in range(3):
        cost.observe_load(128, 10.0)  # loads far slower than anything ...
    assert cost.pays(128) and cost.crossover_tokens() is None  # ... but no step seen yet
    cost.observe_step(32, 1.0)  # below min_step_tokens: not a prefill step, ignored
    assert cost.pays(128) and not cost.known


def test_fit_recovers_fixed_and_per_token_cost_and_the_crossover():
    cost = trained()
    fixed, per_token = cost.load_fit()
    assert fixed == pytest.approx(0.05) and per_token == pytest.approx(1e-4)
    crossover = cost.crossover_tokens()
    assert crossover == pytest.approx(0.05 / (1e-3 - 1e-4))  # ~55.6 tokens
    assert not cost.pays(32) and not cost.pays(55)
    assert cost.pays(56) and cost.pays(8192)


def test_pays_is_monotone_in_length():
    cost = trained(fixed=0.3)
    answers = [cost.pays(n) for n in range(16, 4096, 16)]
    assert answers == sorted(answers)  # False ... False True ... True
    assert not answers[0] and answers[-1]


def test_a_load_slower_per_token_than_recompute_never_pays():
    cost = trained(step_s_per_token=1e-4, fixed=0.0, per_token=1e-3)
    assert cost.crossover_tokens() == math.inf
    assert not any(cost.pays(n) for n in (128, 1024, 16384))


def test_step_estimate_is_a_median_so_an_idle_gap_does_not_move_it():
    cost = trained()
    cost.observe_step(128, 60.0)  # a step interval that included a minute idle
    assert cost.recompute_seconds(1000) == pytest.approx(1.0)


def test_one_refusal_in_explore_every_is_reported_anyway():
    cost = trained(fixed=1.0, explore_every=4)
    assert [cost.pays(64) for _ in range(8)] == [False, False, False, True] * 2


def test_a_fit_from_one_length_treats_the_time_as_fixed_and_stays_non_negative():
    cost = HitCost(explore_every=0)
    for _ in range(3):
        cost.observe_step(1000, 1.0)
        cost.observe_load(512, 0.1)
    assert cost.load_fit() == pytest.approx((0.1, 0.0))
    assert cost.crossover_tokens() == pytest.approx(100.0)
    noisy = HitCost()
    for tokens, secs in ((128, 0.5), (256, 0.2), (512, 0.1)):  # longer loads faster: noise
        noisy.observe_load(tokens, secs)
    fixed, per_token = noisy.load_fit()
    assert fixed >= 0 and per_token >= 0


def service(tmp_path, **settings) -> CacheService:
    layout = make_layout((FULL,), pages=TINY, layers=ONE)
    store = ChunkStore(tmp_path, layout)
    store.ensure_dirs()
    return CacheService(store, HybridKVConfig.from_extra_config(
        {"cache_dir": str(tmp_path), **settings}))


def slow_loads(svc: CacheService) -> None:
    for tokens in (256, 512, 1024):
        svc.observe_step(tokens, 1e-4 * tokens)  # prefill: 10K tokens/s
        svc.observe_load(tokens, 0.5)  # every load: half a second


@pytest.mark.parametrize("on", [False, True])
def test_service_refuses_a_hit_only_with_the_rule_on_and_counts_it(tmp_path, on):
    svc = service(tmp_path, hit_cost_rule=on)
    slow_loads(svc)
    assert svc.hit_pays(1024) is (not on)  # 0.1 s to recompute, 0.5 s to load
    assert svc.hit_pays(16384)  # 1.6 s to recompute: the load pays
    assert svc.counters.get("hits_refused_cost") == int(on)
    assert svc.counters.get("tokens_refused_cost") == 1024 * int(on)


def test_rule_is_off_by_default_and_must_be_a_boolean(tmp_path):
    assert HybridKVConfig.from_extra_config({"cache_dir": str(tmp_path)}).hit_cost_rule is False
    with pytest.raises(ConfigError, match="hit_cost_rule"):
        HybridKVConfig.from_extra_config({"cache_dir": str(tmp_path), "hit_cost_rule": "yes"})
