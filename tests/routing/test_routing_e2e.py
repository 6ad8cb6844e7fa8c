"""End to end: two `hybridkv serve` engines publish KV events; the router routes a prefix to
the one that holds it, and that engine's cached tokens equal the router's prediction.

Engine A serves a prompt; B never sees it (separate cache directories). For a follow-up
that extends the prompt the router must pick A, promise B nothing, and vLLM's
``usage.prompt_tokens_details.cached_tokens`` on A must equal the predicted tokens (GPU
prefix cache first, hybridkv's STORAGE tier after it). Starts two engines: several minutes
on the shared 2-core box. Ports are the OS's (tests/served.py); the router's subscription
is proven by a probe batch that arrives before the test's first request.
"""

from __future__ import annotations

import os
import random
import time

import pytest

from served import kv_events_args, serve

pytestmark = [pytest.mark.engine, pytest.mark.slow]


def _cached(resp: dict) -> int:
    return (resp["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0


def test_router_picks_the_engine_holding_the_prefix(tiny_model, tmp_path):
    from hybridkv.routing.hashing import RequestHasher
    from hybridkv.routing.layout import load_layout
    from hybridkv.routing.router import Router
    from hybridkv.routing.subscriber import EventSubscriber

    model = str(tiny_model("gemma3"))
    rng = random.Random(13)
    prompt = [rng.randrange(4, 500) for _ in range(5 * 128 + 10)]
    follow_up = prompt + [rng.randrange(4, 500) for _ in range(100)]

    args = (*kv_events_args(), "--enable-prompt-tokens-details")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with serve(tmp_path / "a", model, *args) as a, serve(tmp_path / "b", model, *args) as b:
        layout = load_layout(a.cache)
        assert load_layout(b.cache) == layout
        block = min(g.block_tokens for g in layout.groups)
        hasher = RequestHasher("sha256", os.environ.get("PYTHONHASHSEED"), block)
        router = Router(layout, ["b", "a"], hasher=hasher)  # b first: a tie would pick b
        engines = {"a": a, "b": b}
        sub = EventSubscriber(router.index, {n: e.kv_events()["endpoint"]
                                             for n, e in engines.items()})
        try:
            assert sub.wait_connected(30) == []
            for name, engine in engines.items():  # the subscription reached each publisher
                engine.wait_subscribed(lambda n=name: router.index.status(n).batches > 0, block)
            before = router.route(follow_up, record=False)
            assert before.predicted_tokens == 0

            first = a.complete(prompt)
            assert _cached(first) == 0

            def scores():
                return {s.replica: s for s in router.route(follow_up, record=False).replicas}

            deadline = time.time() + 120
            while not (scores()["a"].tiers["GPU"] > 0 and scores()["a"].tiers["STORAGE"] > 0):
                assert time.time() < deadline, (scores(), router.index.status("a"))
                time.sleep(0.5)
            answer = router.route(follow_up)
            by = {s.replica: s for s in answer.replicas}
            assert answer.pick == "a", answer
            assert by["b"].total == 0 and by["b"].tiers == {t: 0 for t in by["b"].tiers}
            # 5 complete 128-token blocks of the prompt: the hit rule's answer on both tiers
            assert by["a"].tiers["GPU"] == by["a"].tiers["STORAGE"] == 640
            served = a.complete(follow_up)
            assert _cached(served) == answer.predicted_tokens == 640, (served["usage"], answer)
            # and the engine that was promised nothing serves nothing from cache
            assert _cached(b.complete(follow_up)) == by["b"].total == 0
        finally:
            sub.close()


@pytest.mark.parametrize("kind", ["qwen3_next"])
def test_prediction_equals_cached_tokens_with_state_groups(kind, tiny_model, tmp_path):
    """A state (gated delta net) model: GPU-tier and STORAGE events of every group, and the
    served follow-up's cached tokens equal the router's prediction."""
    from hybridkv.routing.hashing import RequestHasher
    from hybridkv.routing.layout import load_layout
    from hybridkv.routing.router import Router
    from hybridkv.routing.subscriber import EventSubscriber

    model = str(tiny_model(kind))
    rng = random.Random(7)
    with serve(tmp_path, model, *kv_events_args(), "--enable-prompt-tokens-details") as a:
        layout = load_layout(a.cache)
        block = min(g.block_tokens for g in layout.groups)
        prompt = [rng.randrange(4, 500) for _ in range(3 * block + 10)]
        follow_up = prompt + [rng.randrange(4, 500) for _ in range(50)]
        router = Router(layout, ["a"], hasher=RequestHasher("sha256", os.environ.get(
            "PYTHONHASHSEED"), block))
        sub = EventSubscriber(router.index, {"a": a.kv_events()["endpoint"]})
        try:
            assert sub.wait_connected(30) == []
            a.wait_subscribed(lambda: router.index.status("a").batches > 0, block)
            a.complete(prompt)
            deadline = time.time() + 120
            while router.route(follow_up, record=False).replicas[0].tiers["STORAGE"] == 0:
                assert time.time() < deadline, router.index.status("a")
                time.sleep(0.5)
            time.sleep(2.0)  # let the GPU-tier events of the same step arrive too
            answer = router.route(follow_up)
            served = a.complete(follow_up)
            assert _cached(served) == answer.predicted_tokens > 0, (served["usage"], answer)
        finally:
            sub.close()
