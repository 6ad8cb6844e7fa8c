"""The free-space floor and the no-space back-off (``DiskFloor`` in ``CacheService``).

A fake ``statvfs`` reports a small filesystem whose used bytes are the real files
under the test's directory plus an "external" file size the test sets, so the
service's own writes and evictions move the free space the way a disk would.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from hybridkv.cache import CacheService
from hybridkv.cache.disk_floor import BACKOFF_MIN, EVICT_SHARE, DiskFloor
from hybridkv.config import HybridKVConfig
from hybridkv.groups import GroupKind, GroupSpec, HybridLayout
from hybridkv.keys import make_key
from hybridkv.policies import make_policy
from hybridkv.store.chunk_store import ChunkStore
from hybridkv.store.failures import FAILURE_CAUSES, Warnings, failure_cause
from hybridkv.store.free_space import floor_bytes

pytestmark = pytest.mark.fast

PAGE = 4096
LAYOUT = HybridLayout(model="floor", dtype="bfloat16", groups=(
    GroupSpec(index=0, kind=GroupKind.FULL, block_tokens=16, chunk_tokens=32,
              layer_names=("l0", "l1"), page_bytes=PAGE),))
CHUNK = 4 * PAGE  # payload of one chunk: 2 layers x 2 blocks


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class FakeFs:
    """statvfs of a ``total``-byte filesystem holding the files under ``root`` + ``external``."""

    def __init__(self, root: Path, total: int):
        self.root, self.total, self.external, self.calls = root, total, 0, 0

    def used(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    def free(self) -> int:
        return max(0, self.total - self.used() - self.external)

    def __call__(self, path: str) -> os.statvfs_result:
        self.calls += 1
        blocks, free = self.total // 512, self.free() // 512
        return os.statvfs_result((512, 512, blocks, free, free, 0, 0, 0, 0, 255))


def service(tmp_path: Path, fs: FakeFs, clock: Clock, **settings) -> CacheService:
    store = ChunkStore(tmp_path, LAYOUT)
    store.ensure_dirs()
    config = HybridKVConfig(cache_dir=str(tmp_path), snapshot_interval=0, **settings)
    return CacheService(store, config, policy=make_policy("group_aware", LAYOUT), clock=clock,
                        wall_clock=clock, statvfs=fs)


def store_request(svc: CacheService, name: str, n: int = 3) -> list[bytes]:
    """Offer a request of ``n`` chunks; write what is admitted; returns the keys stored."""
    keys = [make_key(f"{name}:{i}".encode().ljust(16, b"."), 0) for i in range(n)]
    positions = {k: i * 32 for i, k in enumerate(keys)}
    plan = svc.plan_stores(keys, positions, name)
    rng = np.random.default_rng(len(name))
    for cand in plan.admitted:
        svc.store.write(cand.key, position=cand.position, block_offset=0, parent=cand.parent,
                        arrays=[rng.integers(0, 256, (2, PAGE), dtype=np.uint8)] * 2)
    stored = svc.store_done([c.key for c in plan.admitted])
    svc.request_finished(name)
    return [r.key for r in stored]


def test_floor_default_and_spellings():
    assert floor_bytes(None, 100 * 2**30) == 4 * 2**30  # 4 GiB < 5%
    assert floor_bytes(None, 10 * 2**30) == int(10 * 2**30 * 0.05)  # 5% < 4 GiB
    assert floor_bytes("10%", 1000) == 100
    assert floor_bytes(0, 1000) == 0
    assert floor_bytes(123, 1000) == 123


def test_without_budget_free_space_stays_above_the_floor_and_stores_continue(tmp_path):
    clock = Clock()
    fs = FakeFs(tmp_path, total=40 * CHUNK)
    svc = service(tmp_path, fs, clock, min_free_space=8 * CHUNK)
    lowest, stored = fs.total, 0
    for i in range(30):  # 90 chunks offered: more than twice the filesystem
        stored += len(store_request(svc, f"r{i}"))
        lowest = min(lowest, fs.free())
        clock.t += 0.3  # a probe every few requests, not one per store
    assert svc.counters.get("chunks_evicted") > 0
    assert stored > 40, "stores stopped instead of evicting"
    # the allowance: bytes written since the last probe above their reservation (none
    # here: reservations are larger than the files) -> the floor holds
    assert lowest >= svc.disk_floor.floor == 8 * CHUNK, (lowest, svc.disk_floor.floor)
    assert fs.calls <= 30 * 0.3 / 1.0 + 3, "statvfs probed more than once a second"
    assert svc.counters.get("stores_failed") == 0


def test_explicit_budget_still_applies_and_the_floor_on_top(tmp_path):
    clock = Clock()
    fs = FakeFs(tmp_path, total=40 * CHUNK)
    svc = service(tmp_path, fs, clock, disk_budget=12 * CHUNK, min_free_space=8 * CHUNK)
    for i in range(10):
        store_request(svc, f"b{i}")
        clock.t += 1.1
        assert svc.index.bytes_stored <= 12 * CHUNK
    fs.external = 25 * CHUNK  # now the floor binds before the budget
    clock.t += 1.1
    for i in range(3):
        store_request(svc, f"c{i}")
        clock.t += 1.1
    assert fs.free() >= 8 * CHUNK, fs.free()
    # the floor, not the budget, now bounds what this engine keeps
    assert svc.index.bytes_stored < 12 * CHUNK - 3 * CHUNK, svc.index.bytes_stored


def test_external_fill_evicts_one_bounded_round_then_backs_off_then_recovers(tmp_path):
    clock = Clock()
    fs = FakeFs(tmp_path, total=60 * CHUNK)
    svc = service(tmp_path, fs, clock, min_free_space=4 * CHUNK)
    for i in range(8):
        store_request(svc, f"a{i}")
    before = svc.index.bytes_stored
    assert before >= 20 * CHUNK
    fs.external = fs.free()  # another program takes every free byte
    clock.t += 1.1
    store_request(svc, "x0")  # round 1: a bounded eviction
    evicted = before - svc.index.bytes_stored
    assert 0 < evicted <= before // EVICT_SHARE + 3 * (CHUNK + 4096) + svc.capacity.headroom
    fs.external += fs.free()  # and it takes what we freed as well
    clock.t += 1.1
    after_round = svc.index.bytes_stored
    for i in range(20):  # round 2 finds it still full: back off, no eviction, no stores
        assert store_request(svc, f"y{i}") == []
    assert svc.disk_floor.backing_off()
    assert svc.index.bytes_stored == after_round
    assert svc.counters.get("stores_skipped_disk_full") == 60
    probes = fs.calls
    clock.t += 0.5  # within one probe interval: a clock read, no statvfs
    assert store_request(svc, "z") == []
    assert fs.calls == probes, "probed twice within one interval"
    fs.external = 0  # the other program is gone: the next probe, due before the back-off's
    clock.t += 0.6   # delay ends, finds the space and ends it: stores resume at once
    assert clock.t < svc.disk_floor.backoff_until
    assert len(store_request(svc, "resumed")) == 3
    assert fs.calls == probes + 1 and not svc.disk_floor.backing_off()


def test_no_space_failures_evict_then_back_off_even_when_statvfs_shows_room(tmp_path):
    """EDQUOT: a quota is invisible to statvfs; the failure itself is the signal."""
    clock = Clock()
    fs = FakeFs(tmp_path, total=1000 * CHUNK)
    svc = service(tmp_path, fs, clock, min_free_space=0)
    for i in range(10):
        store_request(svc, f"q{i}")
    before = svc.index.bytes_stored
    svc.store_failed_no_space(3)
    store_request(svc, "after1")  # the round's eviction happens on the store path
    assert svc.index.bytes_stored < before + 3 * CHUNK
    assert svc.counters.get("chunks_evicted") > 0
    clock.t += 5.0
    svc.store_failed_no_space(1)  # again within a minute: back off
    assert svc.disk_floor.backing_off()
    assert store_request(svc, "during") == []


def test_statvfs_failure_means_no_floor_not_a_crash(tmp_path, caplog):
    clock = Clock()

    def broken(path):
        raise OSError(5, "Input/output error")

    floor = DiskFloor(tmp_path, None, clock=clock, statvfs=broken)
    with caplog.at_level("WARNING"):
        assert floor.limit(10, 10) is None
        clock.t += 2
        assert floor.limit(10, 10) is None
    assert caplog.text.count("cannot read the free space") == 1


@pytest.mark.parametrize("err,cause", [(28, "no_space"), (122, "no_space"), (13, "permission"),
                                       (1, "permission"), (30, "read_only"), (5, "other")])
def test_failure_cause_by_errno(err, cause):
    assert failure_cause(OSError(err, os.strerror(err))) == cause
    try:
        try:
            raise OSError(err, "x")
        except OSError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as exc:
        assert failure_cause(exc) == cause
    assert cause in FAILURE_CAUSES
    assert failure_cause(ValueError("no errno")) == "other"


def test_one_warning_per_cause_per_minute(caplog):
    import logging

    clock = Clock()
    w = Warnings(logging.getLogger("t"), clock=clock)
    with caplog.at_level("WARNING"):
        assert [w.warn("no_space", "full") for _ in range(50)].count(True) == 1
        assert w.warn("permission", "denied")
        clock.t += 61
        assert w.warn("no_space", "full")
    assert "49 more of this cause" in caplog.text


def test_the_fleet_honours_the_floor_and_only_the_lease_holder_evicts(tmp_path):
    clock = Clock()
    fs = FakeFs(tmp_path, total=40 * CHUNK)
    settings = dict(disk_budget=1000 * CHUNK, fleet="on", min_free_space=8 * CHUNK,
                    refresh_interval=0)
    holder = service(tmp_path, fs, clock, **settings)
    other = service(tmp_path, fs, clock, **settings)
    assert holder.fleet.holder and not other.fleet.holder
    lowest = fs.total
    for i in range(12):
        for name, svc in (("h", holder), ("o", other)):
            store_request(svc, f"{name}{i}")
            lowest = min(lowest, fs.free())
        clock.t += 0.6
    # each engine sees the other's writes at its next probe (once a second): the allowance is
    # what the other stores within one interval (two requests of 3 chunks here)
    assert lowest >= 8 * CHUNK - 6 * (CHUNK + 4096), lowest
    assert holder.counters.get("chunks_evicted") > 0
    assert other.counters.get("chunks_evicted") == 0, "a member without the lease evicted"
    assert other.counters.get("stores_skipped_floor") > 0  # it trimmed its plans instead
