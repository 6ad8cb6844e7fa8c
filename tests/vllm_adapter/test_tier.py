"""``HybridKVTier`` under vLLM's real ``TieringOffloadingManager`` (scheduler side).

vLLM's CPU-tier worker refuses the CPU platform (it asserts CUDA tensors), so no
engine runs here: ``tier_helpers.TierRig`` builds the manager through vLLM's own
spec factory over a real CPU region, writes known bytes where vLLM's GPU -> CPU copy
would, and reads promotions back from the region. Layouts are hand-built hybrid
``KVCacheConfig``s (sliding + full, Mamba state + full, linear state + full).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from vllm.v1.kv_offload.base import LookupResult

import harness as H
from hybridkv.config import ConfigError
from hybridkv.keys import key_group
from hybridkv.vllm import tier_transfer_config
from tier_helpers import TierRig

pytestmark = pytest.mark.fast

HIT, MISS, RETRY = LookupResult.HIT, LookupResult.MISS, LookupResult.RETRY


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return H.write_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def rigs():
    opened: list[TierRig] = []

    def make(*args, **kw) -> TierRig:
        rig = TierRig(*args, **kw)
        opened.append(rig)
        return rig

    yield make
    for rig in opened:
        if rig.rows is not None:
            rig.close()


def chunk_files(cache_dir: Path) -> dict[str, int]:
    return {os.path.join(r, f): os.path.getsize(os.path.join(r, f))
            for r, _, fs in os.walk(cache_dir) for f in fs if f.endswith(".safetensors")}


def file_of(rig: TierRig, key: bytes) -> Path:
    return rig.tier.cache.store.path(key)


# ---------------------------------------------------------------- round trip
@pytest.mark.parametrize("layout", ["gemma", "jamba", "qwen"])
def test_restart_promotes_identical_bytes(model_dir, tmp_path, rigs, layout):
    a = rigs(model_dir, tmp_path / "kv", layout)
    ctx, keys = a.request("r1", 4)
    assert a.store(ctx, keys) == keys
    files = chunk_files(tmp_path / "kv")
    assert len(files) == len(keys)
    for key in keys:  # only the group's own bytes, plus a header
        payload = a.tier.slots.group_bytes(key_group(key))
        assert payload <= os.path.getsize(file_of(a, key)) < payload + 4096
    a.close()

    b = rigs(model_dir, tmp_path / "kv", layout)  # restart: a new engine, new CPU region
    ctx2, keys2 = b.request("r2", 4)
    assert keys2 == keys
    assert b.lookup(ctx2, keys2) == {k: HIT for k in keys2}
    for key in keys2:
        assert b.loaded_bytes(ctx2, key) == b.group_bytes(key, b.expected(key))
    counters = b.tier.cache.counters
    b.close()
    assert counters.get("chunks_loaded") == len(keys)


def test_padded_state_pages_are_not_stored(model_dir, tmp_path, rigs):
    """vLLM pads Mamba state pages to the attention page; the tier stores the state only."""
    rig = rigs(model_dir, tmp_path / "kv", "jamba")
    slots, layout = rig.tier.slots, rig.tier.layout
    for g in layout.groups:
        assert slots.group_bytes(g.index) == g.page_bytes * len(g.layer_names)
    state = [g for g in layout.groups if g.kind.value == "state"]
    assert state and all(slots.group_bytes(g.index) < slots.slot_bytes for g in state)


def test_hit_needs_the_key_of_every_group(model_dir, tmp_path, rigs):
    """A chunk is served per group: a group whose file is gone misses, the others hit
    (vLLM's connector then takes the hit only as far as every group has it)."""
    a = rigs(model_dir, tmp_path / "kv", "gemma")
    ctx, keys = a.request("r1", 3)
    a.store(ctx, keys)
    gone = [k for k in keys if key_group(k) == a.group_ids[-1]][1]
    a.close()
    os.unlink(file_of(a, gone))
    b = rigs(model_dir, tmp_path / "kv", "gemma")
    ctx2, keys2 = b.request("r2", 3)
    results = b.lookup(ctx2, keys2)
    assert results[gone] is MISS
    assert all(r is HIT for k, r in results.items() if k != gone)


# ---------------------------------------------------------------- fail closed
@pytest.mark.parametrize("damage", ["bit_flip", "truncate", "vanish"])
def test_bad_file_is_a_failed_key_never_bytes(model_dir, tmp_path, rigs, damage):
    a = rigs(model_dir, tmp_path / "kv", "qwen")
    ctx, keys = a.request("r1", 3)
    a.store(ctx, keys)
    a.close()
    b = rigs(model_dir, tmp_path / "kv", "qwen")  # the index now holds every key
    bad = keys[1]
    path = file_of(b, bad)
    if damage == "bit_flip":
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) - 7)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x10]))
    elif damage == "truncate":
        os.truncate(path, os.path.getsize(path) - 100)
    else:
        os.unlink(path)
    b.rows[:] = 0xEE  # the region before any promotion
    ctx2, keys2 = b.request("r2", 3)
    results = b.lookup(ctx2, keys2)
    assert results[bad] is MISS  # promoted nothing: vLLM recomputes it
    good = [k for k in keys2 if k != bad]
    assert all(results[k] is HIT for k in good)
    for key in good:
        assert b.loaded_bytes(ctx2, key) == b.group_bytes(key, b.expected(key))
    # no slot holds any byte of the bad chunk: only the good keys' slots were written
    written = sum(bool((row != 0xEE).any()) for row in b.rows)
    assert written == len(good)
    assert b.lookup(ctx2, [bad]) == {bad: MISS}  # and it never hits again
    counters = b.tier.cache.counters
    b.close()
    # caught by the promotion's verification, or (a vanished file of a key restored from
    # the index snapshot) by its first check before a HIT
    assert counters.get("load_failures") + counters.get("restored_chunks_gone") == 1


# ---------------------------------------------------------------- never block
def test_lookup_never_waits_for_a_busy_service(model_dir, tmp_path, rigs):
    rig = rigs(model_dir, tmp_path / "kv", "gemma")
    ctx, keys = rig.request("r1", 2)
    rig.store(ctx, keys)
    _, unknown = rig.request("r2", 1, seed=5)
    runner = rig.tier.runner
    with runner.lock:  # the control thread is busy (e.g. evicting)
        started = time.perf_counter()
        assert rig.tier.lookup(keys[0], ctx) is HIT  # from memory, uncounted
        assert rig.tier.lookup(unknown[0], ctx) is MISS
        assert rig.tier.get_stats() is None  # carried to the next step
        assert time.perf_counter() - started < 0.5
        assert runner.busy_lookups == 2
    assert rig.tier.lookup(keys[0], ctx) is HIT


def test_scheduler_thread_does_no_file_io(model_dir, tmp_path, rigs, monkeypatch):
    """Every file syscall made while vLLM's scheduler thread is inside the tier is a
    failure: lookups, cascades, promotions and results all hand I/O to threads."""
    a = rigs(model_dir, tmp_path / "kv", "jamba", refresh_interval=0.001,
             snapshot_interval=1)
    ctx, keys = a.request("r1", 3)
    a.store(ctx, keys)
    a.close()  # writes the index snapshot: the restart's keys need a recheck

    b = rigs(model_dir, tmp_path / "kv", "jamba", refresh_interval=0.001,
             snapshot_interval=1)
    main = threading.current_thread()
    inside = {"tier": False}
    seen: list[str] = []

    def spy(name, fn):
        def wrapped(*args, **kw):
            if inside["tier"] and threading.current_thread() is main:
                seen.append(f"{name}{args[:1]}")
            return fn(*args, **kw)
        return wrapped

    for name in ("stat", "lstat", "open", "unlink", "replace", "rename", "scandir",
                 "listdir", "fsync", "read", "write", "pread", "readv"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, spy(f"os.{name}", getattr(os, name)))
    tier = b.tier
    for method in ("lookup", "submit_store", "submit_load", "get_finished_jobs", "touch",
                   "on_schedule_end", "on_request_finished", "take_events"):
        original = getattr(tier, method)

        def guarded(*args, _original=original, **kw):
            inside["tier"] = True
            try:
                return _original(*args, **kw)
            finally:
                inside["tier"] = False
        monkeypatch.setattr(tier, method, guarded)

    ctx2, keys2 = b.request("r2", 3)
    results = b.lookup(ctx2, keys2)  # restored keys: RETRY, recheck off-thread, HIT
    assert set(results.values()) == {HIT}
    ctx3, keys3 = b.request("r3", 3, seed=9)  # misses look for other engines' files
    assert set(b.lookup(ctx3, keys3).values()) == {MISS}
    b.store(ctx3, keys3)
    assert seen == []


# ---------------------------------------------------------------- sharing, budget
def test_two_engines_share_one_directory(model_dir, tmp_path, rigs):
    a = rigs(model_dir, tmp_path / "kv", "gemma", refresh_interval=0.01)
    b = rigs(model_dir, tmp_path / "kv", "gemma", refresh_interval=0.01)
    ctx, keys = a.request("r1", 3)
    a.store(ctx, keys)
    time.sleep(0.02)
    ctx_b, keys_b = b.request("rb", 3)
    assert b.lookup(ctx_b, keys_b) == {k: HIT for k in keys_b}  # found on disk, after RETRY
    for key in keys_b:
        assert b.loaded_bytes(ctx_b, key) == b.group_bytes(key, b.expected(key))
    # C stores the same chunks again: deduplicated against A's files
    before = {p: os.stat(p).st_mtime_ns for p in chunk_files(tmp_path / "kv")}
    c = rigs(model_dir, tmp_path / "kv", "gemma", refresh_interval=0.01)
    c.store(*c.request("rc", 3))
    assert {p: os.stat(p).st_mtime_ns for p in chunk_files(tmp_path / "kv")} == before
    assert c.tier.cache.counters.get("chunks_stored") == 0


def test_budget_is_held_with_two_engines(model_dir, tmp_path, rigs):
    probe = rigs(model_dir, tmp_path / "probe", "gemma")
    per_chunk = max(chunk_files(tmp_path / "probe").values(), default=0) or (
        probe.tier.slots.group_bytes(probe.group_ids[0]) + 4096)
    probe.close()
    budget = 12 * (per_chunk + 4096)
    settings = dict(disk_budget=budget, fleet_interval=0.1, refresh_interval=0.01)
    a = rigs(model_dir, tmp_path / "kv", "gemma", **settings)
    b = rigs(model_dir, tmp_path / "kv", "gemma", **settings)
    for i in range(6):
        for rig in (a, b):
            ctx, keys = rig.request(f"{id(rig)}-{i}", 2, seed=100 * i + (rig is b))
            rig.store(ctx, keys)
            time.sleep(0.06)
    for rig in (a, b):
        rig.tier.runner.tick()
        rig.settle()
    time.sleep(0.2)
    a.tier.runner.tick()
    a.settle()
    total = sum(chunk_files(tmp_path / "kv").values())
    assert 0 < total <= budget + 2 * 4096, (total, budget)


# ---------------------------------------------------------------- events, metrics
def test_metrics_and_storage_events(model_dir, tmp_path, rigs):
    rig = rigs(model_dir, tmp_path / "kv", "gemma", kv_events=True)
    ctx, keys = rig.request("r1", 2)
    rig.store(ctx, keys)
    data = rig.manager.get_stats().data["data"]  # vLLM's tiering merges the tier's stats
    stored = data["vllm:kv_offload_hybridkv_stored_chunks"]
    assert sum(stored.values()) == len(keys)  # per (group, kind)
    defs = rig.spec.build_metric_definitions(dict(rig.spec.extra_config))
    assert all(name in defs for name in data if name.startswith("vllm:kv_offload_hybridkv_"))
    events = [e for e in rig.manager.take_events() if e.medium.name == "STORAGE"]
    assert [k for e in events for k in e.keys] == keys and not any(e.removed for e in events)
    # each chunk's parent in its group (what the connector adds to the events for routers)
    parents = {k: rig.tier.cache.index.get(k).parent for k in keys}
    for g in rig.group_ids:
        chain = [k for k in keys if key_group(k) == g]
        assert [parents[k] for k in chain] == [None, *chain[:-1]]


def test_vllm_backpressure_detector_is_fed(model_dir, tmp_path, rigs, monkeypatch):
    """vLLM's tiering builds the tier's ``BackpressureDetector`` from its ``backpressure``
    key and feeds it the bytes of every finished cascade."""
    rig = rigs(model_dir, tmp_path / "kv", "gemma",
               backpressure={"backpressure_cls": "EMABackpressureDetector"})
    detector = rig.tier.bp_detector
    assert type(detector).__name__ == "EMABackpressureDetector"
    fed: list[int] = []
    original = detector.on_store_completed
    monkeypatch.setattr(detector, "on_store_completed",
                        lambda elapsed, nbytes: (fed.append(nbytes), original(elapsed, nbytes)))
    for i in range(3):
        rig.store(*rig.request(f"r{i}", 2, seed=i))
    assert len(chunk_files(tmp_path / "kv")) == 3 * 2 * len(rig.group_ids)
    assert len(fed) == 3 and all(n > 0 for n in fed)


# ---------------------------------------------------------------- configuration
def test_bad_tier_setting_names_the_key(model_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"secondary_tiers\[HybridKVTier\].*disk_budget"):
        TierRig(model_dir, tmp_path / "kv", "gemma", disk_budget="lots")


def test_without_the_connector_a_clear_error(model_dir, tmp_path):
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading.config import (
        build_offloading_config,
    )
    from vllm.v1.kv_offload.factory import OffloadingSpecFactory

    specs, block = H.gemma_layers(16, 32), 16
    config = H.make_vllm_config(model_dir, tmp_path / "kv", block_size=block)
    transfer = tier_transfer_config(str(tmp_path / "kv"), 8 << 20)
    transfer["kv_connector"] = "OffloadingConnector"
    del transfer["kv_connector_module_path"]
    config.kv_transfer_config = KVTransferConfig(**transfer)
    config.kv_transfer_config.engine_id = f"hkv-noconn-{time.time_ns()}"
    _, sched = H.build_kv_cache_configs(config, specs, 400)
    spec = OffloadingSpecFactory.create_spec(build_offloading_config(config, sched))
    with pytest.raises(ConfigError, match="HybridKVConnector"):
        spec.get_manager()


def test_tier_transfer_config_checks_cpu_bytes():
    with pytest.raises(ValueError, match="cpu_bytes_to_use"):
        tier_transfer_config("/tmp/kv", 0)
    cfg = tier_transfer_config("/tmp/kv", 1 << 30, disk_budget="1GiB")
    (tier,) = cfg["kv_connector_extra_config"]["secondary_tiers"]
    assert tier == {"type": "HybridKVTier", "module_path": "hybridkv.vllm.tier",
                    "cache_dir": "/tmp/kv", "disk_budget": "1GiB"}


# ---------------------------------------------------------------- one directory, two modes
def test_a_directory_written_by_the_direct_mode_promotes_under_the_cpu_tier(model_dir,
                                                                            tmp_path, rigs):
    """The direct spec (real Scheduler + hybridkv's worker, ``harness``) and the tier write
    the same files in the same layout directory: the tier serves the direct mode's chunks
    with the bytes of their files."""
    specs, block = H.jamba_specs()
    config = H.make_vllm_config(model_dir, tmp_path / "kv", block_size=block,
                                max_num_batched_tokens=64)
    H.first_run(lambda: H.Engine(config, specs))
    rig = rigs(model_dir, tmp_path / "kv", (specs, block))
    written = {r.key: r for r in rig.tier.cache.store.scan()}
    assert written and all(rig.tier.cache.index.is_stored(k) for k in written)
    from vllm.v1.kv_offload.base import ReqContext

    ctx = ReqContext(req_id="from-direct")
    keys = sorted(written)[:12]
    assert rig.lookup(ctx, keys) == {k: HIT for k in keys}
    for k in keys:
        _, arrays = rig.tier.cache.store.read(k)
        assert rig.loaded_bytes(ctx, k) == b"".join(a.tobytes() for a in arrays)


def test_a_full_disk_is_a_signal_under_the_cpu_tier_too(model_dir, tmp_path, rigs, monkeypatch):
    """A store that fails with ENOSPC is counted by cause and tells the service (which
    evicts a bounded round and backs off), as the direct mode's worker does."""
    import errno

    rig = rigs(model_dir, tmp_path / "kv", "gemma")
    store = rig.tier.cache.store

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "write", full)
    ctx, keys = rig.request("r1", 2)
    rig.store(ctx, keys)  # nothing stored, nothing raised
    counters = rig.tier.cache.counters
    assert counters.get("store_failures_no_space") == len(keys)
    assert counters.get("stores_failed_no_space") == len(keys)
    assert chunk_files(tmp_path / "kv") == {}
    assert {rig.tier.lookup(k, ctx) for k in keys} == {MISS}  # (vLLM's CPU tier has them)
