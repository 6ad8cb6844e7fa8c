"""Per-group Prometheus metrics (``hybridkv.vllm.metrics``).

Fast: every series the stats carry is defined with the right labels (vLLM asserts it);
the per-group disk gauges equal a recount of the index after any sequence of changes.
Engine: a real `hybridkv serve`; `/metrics` moves as the requests imply.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridkv.groups import GroupKind, GroupSpec, HybridLayout, ParallelSpec
from hybridkv.index import ChunkIndex
from hybridkv.keys import make_key

LAYOUT = HybridLayout(
    model="m", dtype="float32", parallel=ParallelSpec(), tokens_per_hash=16,
    groups=(GroupSpec(index=0, kind=GroupKind.FULL, block_tokens=16, chunk_tokens=16,
                      layer_names=("a",), page_bytes=64, dtype="float32"),
            GroupSpec(index=1, kind=GroupKind.SLIDING, block_tokens=16, chunk_tokens=16,
                      layer_names=("b",), page_bytes=64, dtype="float32", window_tokens=32)))


# ---------------------------------------------------------------- fast
@pytest.mark.fast
@settings(deadline=None)  # the first example imports vLLM
@given(st.dictionaries(
    st.sampled_from(["all", "g0", "g1", "g7", "gx"]),
    st.dictionaries(st.sampled_from([
        "lookup_tokens", "lookup_hit_tokens", "chunks_stored", "bytes_stored", "chunks_loaded",
        "bytes_read", "stores_not_admitted", "stores_skipped_budget", "store_failures",
        "load_failures_ChunkCorrupt", "load_failures_OSError", "load_failures",
        "chunks_evicted_budget", "chunks_evicted_orphan", "chunks_evicted", "tokens_from_disk",
        "requests_hit", "requests_load_failed", "startup_chunks", "refresh_found"]),
        st.integers(1, 10**9), max_size=8),
    max_size=5))
def test_every_series_is_defined_with_its_labels(delta):
    from hybridkv.vllm.metrics import counter_stats, metric_definitions

    defs = metric_definitions()
    stats = counter_stats(delta, LAYOUT)
    types = stats.data["types"]
    for name, series in stats.data["data"].items():
        assert name in defs and types[name] == "counter"
        for labels, value in series.items():
            assert len(labels) == len(defs[name].labelnames)
            assert value > 0
            if labels:
                assert labels[:2] in {("0", "full_attention"), ("1", "sliding_window")}
    # what each group counted comes out under its labels, nothing is invented
    for scope in ("g0", "g1"):
        group = scope[1:]
        for name, value in delta.get(scope, {}).items():
            if name == "chunks_stored":
                series = stats.data["data"]["vllm:kv_offload_hybridkv_stored_chunks"]
                kind = LAYOUT.group(int(group)).kind.value
                assert series[(group, kind)] == value
            if name == "load_failures_OSError":
                series = stats.data["data"]["vllm:kv_offload_hybridkv_load_failures"]
                kind = LAYOUT.group(int(group)).kind.value
                assert series[(group, kind, "OSError")] == value
    if "tokens_from_disk" in delta.get("all", {}):
        series = stats.data["data"]["vllm:kv_offload_hybridkv_hit_tokens"]
        assert set(series.values()) == {delta["all"]["tokens_from_disk"]}
        assert len(series) == len(LAYOUT.groups)
    if not any(n in delta.get(s, {}) for s in ("g0", "g1") for n in ("chunks_stored",)):
        assert "vllm:kv_offload_hybridkv_stored_chunks" not in stats.data["data"]


@pytest.mark.fast
def test_counter_deltas_are_taken_once():
    from hybridkv.stats import Counters

    c = Counters(None, "t")
    c.add("chunks_stored", 3, 0)
    assert c.take_delta() == {"all": {"chunks_stored": 3}, "g0": {"chunks_stored": 3}}
    assert c.take_delta() == {}
    c.add("chunks_stored", 2, 1)
    assert c.take_delta() == {"all": {"chunks_stored": 2}, "g1": {"chunks_stored": 2}}
    assert c.get("chunks_stored") == 5  # the JSON files (hybridkv stats) keep totals


_ops = st.lists(st.tuples(st.sampled_from(["reserve", "commit", "release", "add", "remove",
                                           "clear"]),
                          st.integers(0, 11), st.integers(1, 5000)), max_size=60)


@pytest.mark.fast
@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 11), st.integers(1, 5000)), max_size=10), _ops)
def test_disk_usage_equals_a_recount(initial, ops):
    from hybridkv.chunks import ChunkRecord
    from hybridkv.vllm.metrics import DiskUsage

    def key(i):
        return make_key(i.to_bytes(4, "big") * 8, i % 2)

    index = ChunkIndex()
    index.load([ChunkRecord(key(i), i % 2, 16, size, None, 0) for i, size in initial])
    usage = DiskUsage(index)
    for op, i, size in ops:
        k = key(i)
        if op == "reserve" and k not in index:
            index.reserve(k, size)
        elif op == "commit" and index.is_pending(k):
            index.add(k, group=i % 2, position=16, size=size)
        elif op == "release":
            index.release(k)
        elif op == "add":
            index.add(k, group=i % 2, position=16, size=size)
        elif op == "remove":
            index.remove(k)
        elif op == "clear":
            index.clear()
        for g in (0, 1):
            entries = [e for e in index if e.group == g]
            assert usage.bytes.get(g, 0) == sum(e.size for e in entries)
            assert usage.chunks.get(g, 0) == len(entries)


@pytest.mark.fast
def test_manager_stats_count_stores_evictions_by_cause_and_gauges(tmp_path):
    """A chunk whose load failed verification goes as ``failed_verification``, the chunks
    that depended on it as ``orphan``, the rest at a reset as ``reset``; the stats carry
    stores, lookups and the disk gauges (only when they change)."""
    import numpy as np
    from capacity_helpers import (C, FULL, STATE, make_layout, make_manager, request_context,
                                  request_keys)

    from hybridkv.vllm.metrics import PREFIX

    layout = make_layout((FULL, STATE))
    m = make_manager(tmp_path, layout)
    keys = request_keys(layout, (0, 1, 2))
    full, state = keys[0], keys[1]

    def ctx(name):
        return request_context(name, keys)

    first = ctx("first")
    out = m.prepare_store([*full, *state], first)
    for k, pos, parent in zip(out.store_spec.keys, out.store_spec.positions,
                              out.store_spec.parents):
        g = layout.group(int.from_bytes(k[-4:], "big"))
        blocks = 1 if g.kind is STATE else g.blocks_per_chunk
        m.store.write(k, position=pos, block_offset=0, parent=parent, arrays=[
            np.full((blocks, g.page_bytes), 7, np.uint8) for _ in g.layer_names])
    m.complete_store(out.keys_to_store, first)
    m.on_request_finished(first)
    for k in full:
        m.lookup(k, first)
    stored = {g.index: [k for k in out.keys_to_store if k[-4:] == g.index.to_bytes(4, "big")]
              for g in layout.groups}
    sizes = {g: sum(m.store.path(k).stat().st_size for k in ks) for g, ks in stored.items()}
    labels = {g.index: (str(g.index), g.kind.value) for g in layout.groups}

    data = m.get_stats().data["data"]
    for g, ks in stored.items():
        assert data[PREFIX + "stored_chunks"][labels[g]] == len(ks)
        assert data[PREFIX + "stored_bytes"][labels[g]] == sizes[g]
        assert data[PREFIX + "disk_bytes"][labels[g]] == sizes[g]
        assert data[PREFIX + "disk_chunks"][labels[g]] == len(ks)
    assert data[PREFIX + "lookup_tokens"][labels[0]] == 3 * C
    assert data[PREFIX + "lookup_hit_tokens"][labels[0]] == 3 * C
    assert m.get_stats() is None  # nothing moved since

    m.store.path(full[0]).unlink()  # gone: the load fails, its dependants are orphans
    load = [full[0], full[1], state[1]]
    second = ctx("second")
    m.prepare_load(load, second)
    m.complete_load(load, second)
    m.reset_cache()
    data = m.get_stats().data["data"]
    evicted = data[PREFIX + "evicted_chunks"]
    assert evicted[labels[0] + ("failed_verification",)] == 1
    orphans = sum(v for k, v in evicted.items() if k[2] == "orphan")
    reset = sum(v for k, v in evicted.items() if k[2] == "reset")
    assert orphans >= 2  # full[1] and the state at it (at least)
    assert 1 + orphans + reset == len(out.keys_to_store)
    assert all(data[PREFIX + "disk_bytes"][labels[g]] == 0 for g in stored)
    assert m.counters.get("chunks_evicted") == len(out.keys_to_store)  # hybridkv stats


# ---------------------------------------------------------------- engine
def _scrape(server) -> dict[tuple[str, tuple], float]:
    """hybridkv's samples from /metrics: (name, ((label, value), ...)) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(server.get("/metrics")):
        for sample in family.samples:
            if sample.name.startswith("vllm:kv_offload_hybridkv_") and not sample.name.endswith(
                    "_created"):
                labels = tuple(sorted((k, v) for k, v in sample.labels.items()
                                      if k in ("group", "kind", "reason", "cause")))
                out[(sample.name, labels)] = sample.value
    return out


def _per_group(samples, name: str) -> dict[str, float]:
    return {dict(labels)["group"]: value for (n, labels), value in samples.items()
            if n == name}


def _files_per_group(cache) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for path in cache.rglob("*.safetensors"):
        group = str(int.from_bytes(bytes.fromhex(path.stem)[-4:], "big"))
        n, size = out.get(group, (0, 0))
        out[group] = (n + 1, size + path.stat().st_size)
    return out


def _wait(predicate, server, what: str, timeout: float = 60):
    end = time.time() + timeout
    while True:
        samples = _scrape(server)
        if predicate(samples):
            return samples
        assert time.time() < end, f"{what}: {json.dumps({str(k): v for k, v in samples.items()})}"
        server.complete([5, 6, 7])  # a short request steps the engine (stats ride on steps)
        time.sleep(1.0)


@pytest.mark.engine
@pytest.mark.slow
def test_metrics_follow_the_requests(tmp_path, tiny_model):
    from served import serve

    model = str(tiny_model("gemma3"))
    rng = random.Random(3)
    prompt = [rng.randrange(4, 260) for _ in range(700)]
    budget = 64 * 2**20
    with serve(tmp_path, model, "--disk-budget", "64MiB",
               env={"VLLM_SERVER_DEV_MODE": "1"}) as server:
        server.complete(prompt)
        groups = {str(g["index"]): g for g in server.layout()["groups"]}
        chunk = {g: spec["chunk_tokens"] for g, spec in groups.items()}

        def stored_all(samples):
            files = _files_per_group(server.cache)
            stored = _per_group(samples, "vllm:kv_offload_hybridkv_stored_chunks_total")
            disk = _per_group(samples, "vllm:kv_offload_hybridkv_disk_bytes")
            return (set(files) == set(groups) and stored == {g: n for g, (n, _) in files.items()}
                    and disk == {g: b for g, (_, b) in files.items()})

        first = _wait(stored_all, server, "stores of the first request")
        files = _files_per_group(server.cache)
        full = [g for g, spec in groups.items() if spec["kind"] == "full_attention"]
        for g in full:  # 700 tokens: every whole chunk of the full-attention groups
            assert files[g][0] == 700 // chunk[g]
        assert _per_group(first, "vllm:kv_offload_hybridkv_stored_bytes_total") == {
            g: b for g, (_, b) in files.items()}
        assert _per_group(first, "vllm:kv_offload_hybridkv_disk_chunks") == {
            g: n for g, (n, _) in files.items()}
        assert first[("vllm:kv_offload_hybridkv_disk_budget_bytes", ())] == budget
        # the first request looked its prefix up (vLLM asks the sliding and state groups
        # only about positions the full-attention groups can serve) and found nothing
        for g in full:
            assert _per_group(first, "vllm:kv_offload_hybridkv_lookup_tokens_total")[g] > 0
        assert not _per_group(first, "vllm:kv_offload_hybridkv_lookup_hit_tokens_total")
        assert not _per_group(first, "vllm:kv_offload_hybridkv_loaded_chunks_total")
        assert not _per_group(first, "vllm:kv_offload_hybridkv_hit_tokens_total")
        labels = {dict(lb)["group"]: dict(lb)["kind"] for (n, lb) in first if lb}
        assert labels == {g: spec["kind"] for g, spec in groups.items()}

        # the GPU prefix cache forgets the prompt; the repeat loads it from disk
        server.post("/reset_prefix_cache")
        server.complete(prompt)
        hit = (700 - 1) // 128 * 128  # vLLM computes at least the last token

        def loaded(samples):
            return len(_per_group(samples, "vllm:kv_offload_hybridkv_loaded_chunks_total")) == len(
                groups)

        second = _wait(loaded, server, "loads of the repeat")
        assert _per_group(second, "vllm:kv_offload_hybridkv_hit_tokens_total") == {
            g: hit for g in groups}
        assert second[("vllm:kv_offload_hybridkv_requests_hit_total", ())] == 1
        loaded_chunks = _per_group(second, "vllm:kv_offload_hybridkv_loaded_chunks_total")
        loaded_bytes = _per_group(second, "vllm:kv_offload_hybridkv_loaded_bytes_total")
        for g, spec in groups.items():
            if spec["kind"] == "full_attention":
                assert loaded_chunks[g] == hit // chunk[g]  # the whole prefix
            else:  # the window before the hit
                assert 1 <= loaded_chunks[g] <= -(-spec["window_tokens"] // chunk[g]) + 1
            assert loaded_bytes[g] > 0
            assert _per_group(second, "vllm:kv_offload_hybridkv_lookup_hit_tokens_total")[g] > 0
        for g in full:  # the repeat found the whole stored prefix
            assert _per_group(second, "vllm:kv_offload_hybridkv_lookup_hit_tokens_total")[
                g] >= hit
        # nothing new was stored, nothing failed or was evicted
        assert (_per_group(second, "vllm:kv_offload_hybridkv_stored_chunks_total")
                == _per_group(first, "vllm:kv_offload_hybridkv_stored_chunks_total"))
        assert not any(n.endswith(("load_failures_total", "evicted_chunks_total"))
                       for n, _ in second)

        # kept for people: hybridkv's lines of the scrape
        (tmp_path / "metrics.txt").write_text("".join(
            line + "\n" for line in server.get("/metrics").splitlines()
            if "kv_offload_hybridkv" in line))

        # `hybridkv stats` keeps working and agrees with /metrics
        proc = subprocess.run([sys.executable, "-m", "hybridkv.cli", "stats", "--cache-dir",
                               str(server.cache)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        body = proc.stdout.split(":\n", 1)[1]
        totals, end = json.JSONDecoder().raw_decode(body)  # then the lines on store failures
        assert "store failures:" in body[end:]
        for g, n in _per_group(second, "vllm:kv_offload_hybridkv_stored_chunks_total").items():
            assert totals[f"g{g}"]["chunks_stored"] == n


@pytest.mark.fast
def test_store_failures_by_cause_reach_the_metric_and_the_no_space_signal():
    from hybridkv.vllm.metrics import counter_stats, metric_definitions, no_space_failures

    delta = {"g0": {"store_failures_no_space": 3, "store_failures_permission": 1},
             "g1": {"store_failures_no_space": 2, "stores_skipped_floor": 4}}
    stats = counter_stats(delta, LAYOUT)
    series = stats.data["data"]["vllm:kv_offload_hybridkv_store_failures_by_cause"]
    assert series == {("0", "full_attention", "no_space"): 3,
                      ("0", "full_attention", "permission"): 1,
                      ("1", "sliding_window", "no_space"): 2}
    assert len(metric_definitions()["vllm:kv_offload_hybridkv_store_failures_by_cause"]
               .labelnames) == 3
    assert stats.data["data"]["vllm:kv_offload_hybridkv_stores_skipped_floor"] == {
        ("1", "sliding_window"): 4}
    assert no_space_failures(stats) == 5  # what the connector hands the service
    assert no_space_failures(None) == 0
    assert no_space_failures(counter_stats({"g0": {"store_failures_other": 1}}, LAYOUT)) == 0
