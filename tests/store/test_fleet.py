"""Fleet budget coordination (``hybridkv.store.fleet``): lease, usage files, grants, sync."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridkv.index import ChunkIndex
from hybridkv.keys import make_key
from hybridkv.store.chunk_store import ChunkStore
from hybridkv.store.fileio import FileIO
from hybridkv.store.fleet import FleetAction, FleetMember, Lease, sync_index
from test_store import layout

pytestmark = pytest.mark.fast

TTL = 10.0


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def lease(tmp_path, owner, clock):
    return Lease(tmp_path / "fleet" / "lease.json", owner, TTL, io=FileIO(), clock=clock)


# ------------------------------------------------------------------ lease
def test_one_holder_then_takeover_after_expiry(tmp_path):
    clock = Clock()
    a, b = lease(tmp_path, "a", clock), lease(tmp_path, "b", clock)
    assert a.acquire() and a.holds()
    assert not b.acquire() and not b.holds()
    clock.t += TTL / 2  # a renews (more than a third of its time used up)
    assert a.acquire()
    clock.t += TTL * 0.9  # a's first expiry has passed, but it renewed
    assert not b.acquire()
    clock.t += TTL  # a went silent: expired
    assert not a.holds()
    assert b.acquire() and b.holds()
    assert not a.acquire(), "the old holder must not get it back while b holds it"
    assert b.read().owner == "b"


def test_crashed_holder_is_replaced_and_clean_release_is_immediate(tmp_path):
    clock = Clock()
    a = lease(tmp_path, "a", clock)
    assert a.acquire()
    del a  # crashed: never renews, never releases
    b, c = lease(tmp_path, "b", clock), lease(tmp_path, "c", clock)
    clock.t += TTL - 0.1
    assert not b.acquire() and not c.acquire()
    clock.t += 0.2
    assert b.acquire() and not c.acquire()
    b.release()  # clean shutdown: no need to wait for expiry
    assert not (tmp_path / "fleet" / "lease.json").exists()
    assert c.acquire() and c.holds() and not b.holds()


def test_a_lease_too_close_to_expiry_to_use_is_still_released(tmp_path):
    clock = Clock()
    a = lease(tmp_path, "a", clock)
    assert a.acquire()
    clock.t += TTL * 0.9  # idle: within the margin, a no longer evicts on it
    assert not a.acquire() and not a.holds()
    a.release()  # clean shutdown
    assert not a.path.exists()


def test_garbled_lease_file_is_taken_once_stale(tmp_path):
    clock = Clock()
    path = tmp_path / "fleet" / "lease.json"
    path.parent.mkdir()
    path.write_bytes(b"{not json")
    clock.t = path.stat().st_mtime + 1
    a = lease(tmp_path, "a", clock)
    assert not a.acquire()  # fresh garbage: maybe a writer in the middle of something
    clock.t += TTL + 1
    assert a.acquire() and a.read().owner == "a"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.floats(0.0, 12.0)), min_size=1, max_size=40))
def test_at_most_one_holder_at_any_time(tmp_path_factory, steps):
    """Three members acquire at random moments (some go silent for long):
    at no moment do two of them believe they hold the lease."""
    root = tmp_path_factory.mktemp("lease")
    clock = Clock()
    members = [lease(root, f"m{i}", clock) for i in range(3)]
    for who, dt in steps:
        clock.t += dt
        members[who].acquire()
        holders = [m.owner for m in members if m.holds()]
        assert len(holders) <= 1, holders
        if holders:
            assert members[0].read().owner == holders[0]


# ------------------------------------------------------------------ usage and grants
def member(tmp_path, name, clock, budget=1000, **kw):
    return FleetMember(tmp_path, budget, member_id=name, clock=clock, lease_ttl=TTL, **kw)


def test_usage_is_published_and_counted_by_others(tmp_path):
    clock = Clock()
    a, b = member(tmp_path, "a", clock), member(tmp_path, "b", clock)
    assert b.usage() == 0
    assert a.admit(100)
    # a claimed a grant of its own (>= 100) before admitting; b sees the claim
    seen = b.read_members()["a"]
    assert seen.admitted + seen.grant >= 100 and seen.heartbeat == clock.t
    assert b.usage() == a.usage() >= 100
    a.done(100)
    assert a.inflight == 0 and a.admitted == 100


def test_grants_never_oversubscribe_the_budget(tmp_path):
    """Members admit in turns until refused: together they admit no more than the budget,
    and a refusal is published as demand (for the holder)."""
    clock = Clock()
    ms = [member(tmp_path, f"m{i}", clock, budget=10_000) for i in range(3)]
    refused = set()
    for turn in range(200):
        m = ms[turn % 3]
        if m.admit(97):
            continue
        refused.add(m.member_id)
        clock.t += 1  # past the member's back-off
    total = sum(m.admitted for m in ms)
    assert 10_000 - 3 * 97 < total <= 10_000
    assert refused == {"m0", "m1", "m2"}
    assert any(u.demand for u in ms[0].read_members().values())


def test_holder_sync_sets_baselines_and_forgets_dead_members(tmp_path):
    clock = Clock()
    a, b = member(tmp_path, "a", clock), member(tmp_path, "b", clock)
    assert a.poll(force=True) is FleetAction.SYNC  # a becomes the holder
    assert b.admit(300)
    b.done(300)  # b's file is on disk now: the holder's listing will count it
    assert b.poll(force=True) is None  # not the holder; publishes its figures
    snap = a.begin_sync()
    state = a.finish_sync(snap, disk_bytes=300)
    assert state.baselines["b"] == 300 and state.base == 300 + snap.inflight
    # b's 300 bytes now count once (in base), not twice; its unused grant still counts
    assert a.usage() == 300 + b.grant
    clock.t += 3 * TTL  # b dies
    a.lease.acquire()
    a.finish_sync(a.begin_sync(), disk_bytes=300)
    assert "b" not in a.read_members()
    assert a.usage() == 300


def test_a_member_silent_past_the_usage_ttl_drops_its_grant(tmp_path):
    clock = Clock()
    a = member(tmp_path, "a", clock)
    assert a.admit(10) and a.grant > 0
    clock.t += 2 * TTL  # the holder may have declared a dead and removed its file
    os.unlink(a.usage_path)
    assert a.admit(10)  # a claims afresh: published again before use
    published = a.read_members()["a"]
    assert published.heartbeat == clock.t  # the old grant was not used silently
    assert published.grant == a.grant + 10  # the claim covers what it admitted since


# ------------------------------------------------------------------ directory sync
def test_sync_index_finds_new_files_and_drops_vanished_ones(tmp_path):
    s = ChunkStore(tmp_path, layout())
    s.ensure_dirs()
    rng = np.random.default_rng(0)
    keys = [make_key(bytes([i]) * 16, i % 2) for i in range(6)]
    for k in keys:
        s.write(k, position=32, block_offset=0,
                arrays=[rng.integers(0, 256, (2, 64), dtype=np.uint8)] * 2)
    index = ChunkIndex()
    index.load([s.describe(k) for k in keys[:3]])
    index.pin(keys[0])
    index.reserve(keys[5], 100)  # being stored by this process: left alone
    s.delete(keys[0])  # pinned: stays until its load fails
    s.delete(keys[1])  # gone: dropped
    (s.path(keys[1]).parent / "not-a-key.safetensors").write_bytes(b"x")
    added, removed = sync_index(s, index)
    assert (added, removed) == (2, 1)
    assert keys[0] in index and keys[1] not in index
    assert {keys[2], keys[3], keys[4]} <= {e.key for e in index}
    assert keys[5] not in index and index.is_pending(keys[5])


# ------------------------------------------------------------------ settings
def test_fleet_settings_are_validated_with_the_key_named(tmp_path):
    from hybridkv.config import ConfigError, HybridKVConfig

    def parse(**extra):
        return HybridKVConfig.from_extra_config({"cache_dir": str(tmp_path), **extra})

    assert parse(disk_budget="1GiB").fleet_enabled  # the default, auto: on with a budget
    assert parse(disk_budget="1GiB", fleet="auto").fleet_enabled
    assert not parse().fleet_enabled  # no budget, nothing to share
    assert not parse(fleet="auto").fleet_enabled
    assert not parse(disk_budget="1GiB", fleet=False).fleet_enabled
    assert parse(disk_budget=10, fleet=True, fleet_interval=2, fleet_lease_ttl=30).fleet == "on"
    for bad, key in (({"fleet": "maybe"}, "fleet"), ({"fleet": "on"}, "fleet"),
                     ({"fleet_interval": 0}, "fleet_interval"),
                     ({"fleet_interval": True}, "fleet_interval"),
                     ({"fleet_lease_ttl": 0.5}, "fleet_lease_ttl"),
                     ({"fleet_lease_ttl": "15s"}, "fleet_lease_ttl")):
        with pytest.raises(ConfigError, match=f"^{key}:"):
            parse(**bad)


def test_a_refused_member_asks_the_holder_for_room_until_it_gives_up(tmp_path):
    clock = Clock()
    holder = member(tmp_path, "h", clock, budget=1000, interval=2.0)
    other = member(tmp_path, "o", clock, budget=1000, interval=2.0)
    assert holder.poll(force=True) is FleetAction.SYNC
    holder.finish_sync(holder.begin_sync(), disk_bytes=0)
    assert holder.admit(900)
    assert not other.admit(300)  # the fleet is full: refused, demand published
    assert other.read_members()["o"].demand == 300
    assert holder.poll(force=True) is FleetAction.EVICT and holder.wanted == 300
    clock.t += 2.5  # not asked again within the interval: the demand is withdrawn
    assert other.poll(force=True) is None
    assert other.read_members()["o"].demand == 0
    holder.done(900)  # stored: the holder's sync lists it
    holder.finish_sync(holder.begin_sync(), disk_bytes=900)
    assert holder.poll(force=True) is None and holder.wanted == 0
