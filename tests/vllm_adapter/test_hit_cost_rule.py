"""``hit_cost_rule`` under vLLM's real Scheduler (``tests/harness.py``): the connector times
steps and loads for ``CacheService``, and a hit the service says does not pay is recomputed
(vLLM gets 0 external tokens), with the rule off every servable hit is loaded."""

from __future__ import annotations

import pytest

import harness as H
from harness import PROMPTS, first_run, oracle_hit

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return H.write_tiny_model(tmp_path_factory.mktemp("model"))


def make(model_dir, cache_dir, **settings):
    config = H.make_vllm_config(model_dir, cache_dir, block_size=16,
                                max_num_batched_tokens=64, **settings)
    return H.Engine(config, H.gemma_layers(16, window=40))


def test_connector_feeds_the_rule_real_steps_and_loads(model_dir, tmp_path):
    first_run(lambda: make(model_dir, tmp_path / "kv"))
    e = make(model_dir, tmp_path / "kv", hit_cost_rule=True)
    cost = e.manager.cache.hit_cost
    e.serve({"new": H.token_ids(9, 200)})  # a miss: prefill steps of 64 tokens
    assert cost.recompute_seconds(1000) > 0  # were timed
    expected = oracle_hit(e, PROMPTS["a"])
    e.serve({"a": PROMPTS["a"]})
    assert expected > 0 and e.external_tokens["a"] == expected  # loads not known yet: loaded
    assert cost.load_fit() != (0.0, 0.0)  # and the load, scheduled to ready
    e.shutdown()


@pytest.mark.parametrize("on", [True, False])
def test_a_hit_that_does_not_pay_is_recomputed_only_with_the_rule_on(model_dir, tmp_path, on):
    first_run(lambda: make(model_dir, tmp_path / "kv"))
    e = make(model_dir, tmp_path / "kv", hit_cost_rule=on)
    expected = oracle_hit(e, PROMPTS["b"])
    for tokens in (256, 512, 1024):  # prefill 1M tokens/s, every load a second
        e.manager.cache.hit_cost is None or e.manager.cache.hit_cost.observe_step(
            tokens, tokens * 1e-6)
        e.manager.cache.observe_load(tokens, 1.0)
    e.serve({"b": PROMPTS["b"]})
    assert expected > 0
    assert e.external_tokens.get("b", 0) == (0 if on else expected)
    assert e.manager.counters.get("hits_refused_cost") == int(on)
    assert e.manager.counters.get("tokens_from_disk") == (0 if on else expected)
    e.shutdown()
