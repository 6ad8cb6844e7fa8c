"""The index snapshot: round trip, changes since it was taken, bad snapshots, the manager.

The hard rule under test: whatever happened to the directory or to the snapshot
file (stale, truncated, bit-flipped, hand-edited with a valid checksum), the
manager never reports a HIT for a file that is missing or whose size/mtime is
not what its index says, and every valid file on disk is found.
"""

from __future__ import annotations

import logging
import os
import struct
import tempfile
from pathlib import Path

import msgspec
import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybridkv.chunks import ChunkRecord
from hybridkv.config import ConfigError, HybridKVConfig
from hybridkv.groups import GroupKind, GroupSpec, HybridLayout
from hybridkv.index import ChunkIndex
from hybridkv.keys import make_key
from hybridkv.store.chunk_store import ChunkStore
from hybridkv.store.snapshot import (
    SNAPSHOT_VERSION,
    Snapshot,
    SnapshotWriter,
    encode_snapshot,
    full_scan,
    read_snapshot,
    recheck,
    restore,
    write_snapshot,
)

pytestmark = pytest.mark.fast

HIT = "HIT"


def layout(model="tiny"):
    return HybridLayout(model=model, dtype="bfloat16", groups=(
        GroupSpec(index=0, kind=GroupKind.FULL, block_tokens=16, chunk_tokens=32,
                  layer_names=("l0",), page_bytes=32),
        GroupSpec(index=1, kind=GroupKind.SLIDING, block_tokens=16, chunk_tokens=32,
                  layer_names=("l1",), page_bytes=32, window_tokens=40),
        GroupSpec(index=2, kind=GroupKind.STATE, block_tokens=16, chunk_tokens=32,
                  layer_names=("m2",), page_bytes=48),
    ))


def write_chunk(store: ChunkStore, key: bytes, blocks: int = 1, seed: int = 0,
                parent: bytes | None = None) -> None:
    g = store.layout.group(int.from_bytes(key[-4:], "big"))
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 256, (blocks, g.page_bytes), dtype=np.uint8)
              for _ in g.layer_names]
    assert store.write(key, position=32, block_offset=0, arrays=arrays, parent=parent) > 0


def rewrite_chunk(store: ChunkStore, key: bytes, blocks: int) -> None:
    """The same chunk written again (as another engine would), holding ``blocks`` blocks."""
    try:
        parent = store.describe(key).parent
    except Exception:  # a garbled file: written again from scratch
        parent = None
    store.delete(key)
    write_chunk(store, key, blocks=blocks, seed=99, parent=parent)


def chain_keys(n: int, tag: int = 0) -> list[bytes]:
    """``n`` prefix positions, a key per group at each."""
    return [make_key(bytes([tag, i]) * 8, g) for i in range(n) for g in range(3)]


def make_store(root, n: int = 8) -> tuple[ChunkStore, list[bytes]]:
    store = ChunkStore(root, layout())
    store.ensure_dirs()
    keys = chain_keys(n)
    for i, key in enumerate(keys):
        parent = keys[i - 3] if i >= 3 else None
        write_chunk(store, key, seed=i, parent=parent)
    return store, keys


def facts(records) -> set[tuple]:
    return {(r.key, r.group, r.position, r.size, r.parent, r.mtime_ns) for r in records}


def manager(store: ChunkStore, **settings):
    from hybridkv.vllm.manager import HybridKVManager

    settings.setdefault("refresh_interval", 0)  # a MISS must not be rescued by a refresh
    return HybridKVManager(store, HybridKVConfig(cache_dir=str(store.paths.cache_dir),
                                                 **settings))


def lookup(mgr, key: bytes) -> str:
    return mgr.lookup(key, None).name


def assert_hits_are_true(store: ChunkStore, mgr, universe) -> None:
    """HIT <=> a valid file, and the index says its real size and mtime."""
    for key in universe:
        try:
            want = store.describe(key)
        except Exception:  # gone, or a header that does not describe this chunk
            want = None
        got = lookup(mgr, key)
        if want is None:
            assert got != HIT, f"HIT for {key.hex()} whose file is missing or unusable"
            continue
        assert got == HIT, f"valid file {key.hex()} not found"
        entry = mgr.index.get(key)
        assert (entry.size, entry.mtime_ns) == (want.size, want.mtime_ns)
        assert (entry.position, entry.parent) == (want.position, want.parent)


# ---------------------------------------------------------------- round trip
def test_round_trip_keeps_records_and_recency(tmp_path):
    store, keys = make_store(tmp_path)
    index = ChunkIndex()
    index.load(full_scan(store), by_mtime=False)
    for key in keys[5:1:-1]:  # change recency: these become the most recent
        index.touch(key)
    write_snapshot(store, index.records())

    out = restore(store)
    assert out.source == "snapshot" and out.kept == len(keys)
    assert (out.added, out.dropped, out.changed) == (0, 0, 0)
    assert out.records == index.records()  # same records, least recently used first
    assert out.unchecked == set(keys)
    again = ChunkIndex()
    again.load(out.records, by_mtime=False)
    assert again.records() == index.records()


def test_snapshot_file_is_where_paths_say_and_atomic(tmp_path):
    store, keys = make_store(tmp_path, 2)
    write_snapshot(store, full_scan(store))
    path = store.paths.snapshot()
    assert path == store.paths.layout_dir / "r0" / "index.snapshot"
    assert read_snapshot(store).records and not [
        n for n in os.listdir(path.parent) if n.endswith(".tmp")]
    assert {r.key for r in full_scan(store)} == set(keys)  # the scan does not see it


# ---------------------------------------------------------------- changes since
@pytest.mark.parametrize("check_stats", [False, True])
def test_changes_since_the_snapshot_are_reflected(tmp_path, check_stats):
    store, keys = make_store(tmp_path)
    write_snapshot(store, full_scan(store))
    added = chain_keys(2, tag=7)
    for i, key in enumerate(added):
        write_chunk(store, key, seed=100 + i)
    removed, changed = keys[:2], keys[5:7]
    for key in removed:
        store.delete(key)
    for key in changed:
        rewrite_chunk(store, key, blocks=2)

    out = restore(store, check_stats=check_stats)
    assert out.source == "snapshot"
    assert (out.added, out.dropped) == (len(added), len(removed))
    now = full_scan(store)
    assert {r.key for r in out.records} == {r.key for r in now}
    if check_stats:
        assert out.changed == len(changed) and not out.unchecked
        assert facts(out.records) == facts(now)
    else:
        assert out.changed == 0
        assert set(changed) <= out.unchecked and not set(added) & out.unchecked
        for key in changed:
            old = next(r for r in out.records if r.key == key)
            same, record = recheck(store, key, old.size, old.mtime_ns)
            assert not same and record == store.describe(key)
        for key in keys[2:5]:
            old = next(r for r in out.records if r.key == key)
            assert recheck(store, key, old.size, old.mtime_ns) == (True, None)
    assert out.records[-len(added):] == sorted(out.records[-len(added):],
                                               key=lambda r: r.mtime_ns)


def test_recheck_of_a_gone_or_garbled_file(tmp_path):
    store, keys = make_store(tmp_path, 2)
    rec = store.describe(keys[0])
    store.delete(keys[0])
    assert recheck(store, keys[0], rec.size, rec.mtime_ns) == (False, None)
    rec = store.describe(keys[1])
    store.path(keys[1]).write_bytes(b"\0" * 50)  # in place: size and mtime change
    assert recheck(store, keys[1], rec.size, rec.mtime_ns) == (False, None)


# ---------------------------------------------------------------- bad snapshots
def _reencode(data: bytes, edit) -> bytes:
    """A hand edit that keeps the checksum valid."""
    head = struct.unpack_from("<8sIQQ", data)
    snap = msgspec.msgpack.decode(data[28:], type=Snapshot)
    body = msgspec.msgpack.encode(edit(snap))
    return struct.pack("<8sIQQ", head[0], head[1], len(body),
                       xxhash.xxh3_64_intdigest(body)) + body


def _flip(data: bytes, at: int) -> bytes:
    if not data:  # an earlier edit truncated it to nothing: no bit to flip
        return data
    b = bytearray(data)
    b[at % len(b)] ^= 0x10
    return bytes(b)


BAD = {
    "empty": lambda d, s: b"",
    "truncated_head": lambda d, s: d[:9],
    "truncated_body": lambda d, s: d[: len(d) // 2],
    "padded": lambda d, s: d + b"\0",
    "bit_flip_body": lambda d, s: _flip(d, len(d) - 7),
    "bit_flip_length": lambda d, s: _flip(d, 13),
    "bad_magic": lambda d, s: b"X" + d[1:],
    "newer_version": lambda d, s: d[:8] + struct.pack("<I", SNAPSHOT_VERSION + 1) + d[12:],
    "newer_version_in_body": lambda d, s: _reencode(
        d, lambda sn: msgspec.structs.replace(sn, version=SNAPSHOT_VERSION + 1)),
    "wrong_fingerprint": lambda d, s: b"".join(encode_snapshot(
        layout("other").fingerprint, 0, full_scan(s))),
    "wrong_rank": lambda d, s: b"".join(encode_snapshot(s.fingerprint, 3, full_scan(s))),
    "not_msgpack": lambda d, s: _reencode_raw(d, b"\xc1garbage"),
    "group_contradicts_key": lambda d, s: _reencode(d, lambda sn: msgspec.structs.replace(
        sn, records=[msgspec.structs.replace(sn.records[0], group=1)] + sn.records[1:])),
    "parent_of_another_group": lambda d, s: _reencode(d, lambda sn: msgspec.structs.replace(
        sn, records=[msgspec.structs.replace(sn.records[-1], parent=sn.records[0].key[:-4]
                                             + b"\0\0\0\x09")] + sn.records[:-1])),
    # values the index's columns cannot hold (a hand edit): never a crash at start
    "size_out_of_range": lambda d, s: _reencode(d, lambda sn: _replace_first(sn, size=2**40)),
    "negative_size": lambda d, s: _reencode(d, lambda sn: _replace_first(sn, size=-1)),
    "position_out_of_range": lambda d, s: _reencode(
        d, lambda sn: _replace_first(sn, position=2**31)),
    "mtime_beyond_int64": lambda d, s: _reencode(
        d, lambda sn: _replace_first(sn, mtime_ns=2**64 - 1)),
    "short_key": lambda d, s: _reencode(d, lambda sn: msgspec.structs.replace(
        sn, records=[ChunkRecord(b"\0\0\0\0", 0, 32, 10, None, 1)] + sn.records)),
}


def _replace_first(sn: Snapshot, **changes) -> Snapshot:
    return msgspec.structs.replace(
        sn, records=[msgspec.structs.replace(sn.records[0], **changes)] + sn.records[1:])


def _reencode_raw(data: bytes, body: bytes) -> bytes:
    head = struct.unpack_from("<8sIQQ", data)
    return struct.pack("<8sIQQ", head[0], head[1], len(body), xxhash.xxh3_64_intdigest(body)) + body


@pytest.mark.parametrize("bad", sorted(BAD))
def test_bad_snapshot_falls_back_to_the_full_scan(tmp_path, bad, caplog):
    store, keys = make_store(tmp_path)
    write_snapshot(store, full_scan(store))
    store.delete(keys[3])  # the stale snapshot names it; the scan must not
    rewrite_chunk(store, keys[4], blocks=2)
    path = store.paths.snapshot()
    path.write_bytes(BAD[bad](path.read_bytes(), store))
    with caplog.at_level(logging.INFO, logger="hybridkv.store.snapshot"):
        out = restore(store)
    assert out.source == "scan" and out.reason.startswith("snapshot ignored"), out.reason
    assert facts(out.records) == facts(full_scan(store)) and not out.unchecked
    assert any("full header scan" in r.message and r.levelno == logging.INFO
               for r in caplog.records)
    mgr = manager(store)
    assert_hits_are_true(store, mgr, keys)


def test_full_scan_logs_progress_with_counts(tmp_path, caplog):
    store, keys = make_store(tmp_path, 4)
    with caplog.at_level(logging.INFO, logger="hybridkv.store.snapshot"):
        restore(store, log_every=0.0)
    lines = [r.getMessage() for r in caplog.records if "full header scan" in r.message]
    assert len(lines) > len(keys) // 2  # progress, then the total
    assert f"{len(keys)} chunks in" in lines[-1] and "no snapshot" not in lines[-1]


def test_hand_edited_snapshot_never_hits_a_missing_or_changed_file(tmp_path):
    store, keys = make_store(tmp_path)
    write_snapshot(store, full_scan(store))
    ghost_same_dir = keys[0][:-4][:1] + b"\xee" * 15 + keys[0][-4:]  # same <hh> directory
    ghost_new_dir = make_key(b"\xfe" * 16, 2)

    def edit(sn):
        recs = list(sn.records)
        by_key = {r.key: i for i, r in enumerate(recs)}
        i, j = by_key[keys[1]], by_key[keys[2]]
        recs[i] = msgspec.structs.replace(recs[i], size=recs[i].size + 1000)
        recs[j] = msgspec.structs.replace(recs[j], mtime_ns=recs[j].mtime_ns - 10**9,
                                          position=999)
        recs += [ChunkRecord(ghost_same_dir, 0, 32, 100, None, 1),
                 ChunkRecord(ghost_new_dir, 2, 32, 100, None, 1)]
        return msgspec.structs.replace(sn, records=recs)

    path = store.paths.snapshot()
    path.write_bytes(_reencode(path.read_bytes(), edit))
    assert restore(store).source == "snapshot"  # the checksum is valid: it is used
    mgr = manager(store)
    assert ghost_same_dir not in mgr.index and ghost_new_dir not in mgr.index
    assert_hits_are_true(store, mgr, keys + [ghost_same_dir, ghost_new_dir])
    assert mgr.counters.get("restored_chunks_changed") == 2


def test_hand_edited_parent_or_position_is_corrected_at_the_first_hit(tmp_path):
    """Size and mtime still match the file: only its header tells (found by hypothesis)."""
    store, keys = make_store(tmp_path)
    write_snapshot(store, full_scan(store))
    other_parent = make_key(b"\x77" * 16, 0)  # same group, never stored

    def edit(sn):
        recs = list(sn.records)
        by_key = {r.key: i for i, r in enumerate(recs)}
        i, j = by_key[keys[3]], by_key[keys[4]]
        recs[i] = msgspec.structs.replace(recs[i], parent=other_parent)
        recs[j] = msgspec.structs.replace(recs[j], position=4096)
        return msgspec.structs.replace(sn, records=recs)

    path = store.paths.snapshot()
    path.write_bytes(_reencode(path.read_bytes(), edit))
    mgr = manager(store)
    assert mgr.counters.get("startup_from_snapshot") == 1
    assert mgr.index.get(keys[3]).parent == other_parent  # believed until its first HIT
    assert_hits_are_true(store, mgr, keys)
    assert mgr.counters.get("restored_chunks_changed") == 2


def test_names_count_only_in_their_own_directory(tmp_path):
    """A chunk file copied to another <hh> directory, a one-letter directory or another
    group's directory is not where the store reads: its record is dropped."""
    store, keys = make_store(tmp_path, 4)
    write_snapshot(store, full_scan(store))
    gone = keys[0]
    data = store.path(gone).read_bytes()
    name = store.path(gone).name
    wrong_hh = "00" if name[:2] != "00" else "01"
    other_group = store.paths.group_dir(1 if int.from_bytes(gone[-4:], "big") != 1 else 0)
    for d in (store.paths.group_dir(0) / wrong_hh, store.paths.group_dir(0) / name[:1],
              other_group / name[:2]):
        d.mkdir(exist_ok=True)
        (d / name).write_bytes(data)
    store.delete(gone)
    out = restore(store)
    assert out.source == "snapshot" and (out.kept, out.dropped, out.added) == (len(keys) - 1, 1, 0)
    assert gone not in {r.key for r in out.records}
    assert_hits_are_true(store, manager(store), keys)


def test_duplicate_records_keep_the_first(tmp_path):
    store, keys = make_store(tmp_path, 2)
    recs = full_scan(store)
    dup = msgspec.structs.replace(recs[0], size=recs[0].size + 1)
    write_snapshot(store, recs + [dup])
    out = restore(store)
    assert out.source == "snapshot" and (out.kept, out.dropped) == (len(keys), 1)
    assert facts(out.records) == facts(recs)


def test_keys_of_several_lengths(tmp_path):
    """The column checks take a slower path when keys differ in length; same results."""
    store, keys = make_store(tmp_path, 2)
    longer = [make_key(b"\x05" * 28, g) for g in range(3)]
    for i, key in enumerate(longer):
        write_chunk(store, key, seed=50 + i)
    write_snapshot(store, full_scan(store))
    store.delete(keys[0])
    out = restore(store)
    assert out.source == "snapshot" and (out.kept, out.dropped) == (len(keys) + 2, 1)
    assert facts(out.records) == facts(full_scan(store))
    bad = [msgspec.structs.replace(r, group=(r.group + 1) % 3) if r.key == longer[0] else r
           for r in full_scan(store)]
    write_snapshot(store, bad)
    assert restore(store).reason.startswith("snapshot ignored: record")


def test_stale_temp_files_are_found_by_the_snapshot_listing(tmp_path, monkeypatch):
    """With a snapshot the chunk directories are listed once: their temp files are
    cleaned from that listing, every other directory by the usual walk."""
    from hybridkv.store.file_map import tmp_name_prefix

    store, keys = make_store(tmp_path, 2)
    write_snapshot(store, full_scan(store))
    host = tmp_name_prefix().split(".")[1]
    leaf = store.path(keys[0]).parent
    stale_leaf = leaf / f".{host}.999999999.1.x.safetensors.tmp"
    stale_rank = store.paths.rank_dir() / f".{host}.999999999.2.index.snapshot.tmp"
    stale_other = store.paths.group_dir(0) / "zz"  # not a <hh> directory: walked
    stale_other.mkdir()
    stale_other = stale_other / f".{host}.999999999.3.y.tmp"
    alive = leaf / f".{host}.{os.getpid()}.4.y.safetensors.tmp"
    for f in (stale_leaf, stale_rank, stale_other, alive):
        f.write_bytes(b"x")
    walked: list[str] = []
    real_walk = os.walk

    def spy(top, *a, **k):
        for dirpath, dirs, files in real_walk(top, *a, **k):
            walked.append(dirpath)
            yield dirpath, dirs, files

    monkeypatch.setattr(os, "walk", spy)
    out = restore(store, clean_temp=True)
    assert out.source == "snapshot" and out.tmp_removed == 3
    assert not (stale_leaf.exists() or stale_rank.exists() or stale_other.exists())
    assert alive.exists() and out.kept == len(keys)
    assert str(leaf) not in walked and str(store.paths.rank_dir()) in walked
    monkeypatch.setattr(os, "walk", real_walk)
    stale_leaf.write_bytes(b"x")
    mgr = manager(store)
    assert mgr.counters.get("startup_tmp_removed") == 1 and not stale_leaf.exists()
    assert {"restore", "index_load", "total"} <= set(mgr.startup_seconds)


def test_a_file_claiming_a_huge_header_is_ignored_not_fatal(tmp_path):
    store, keys = make_store(tmp_path, 2)
    write_snapshot(store, full_scan(store))
    store.path(keys[0]).write_bytes(b"\1" * 77)  # header length 0x0101010101010101
    mgr = manager(store)
    assert lookup(mgr, keys[0]) != HIT


# ---------------------------------------------------------------- hypothesis
ops = st.lists(st.tuples(st.sampled_from(["delete", "rewrite", "add", "garble"]),
                         st.integers(0, 29)), max_size=8)
edits = st.lists(st.tuples(
    st.sampled_from(["drop", "size", "mtime", "ghost", "dup", "truncate", "flip"]),
    st.integers(0, 10**6)), max_size=4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, edits=edits)
def test_random_directory_and_snapshot_edits_never_give_a_false_hit(ops, edits):
    with tempfile.TemporaryDirectory() as root:
        store, keys = make_store(root, 6)  # 18 keys
        write_snapshot(store, full_scan(store))
        extra = chain_keys(4, tag=9)  # 12 keys not stored yet
        universe = keys + extra
        for op, i in ops:
            key = universe[i]
            if op == "delete":
                store.delete(key)
            elif op == "rewrite" and store.exists(key):
                rewrite_chunk(store, key, blocks=1 + i % 2)
            elif op == "add" and not store.exists(key):
                write_chunk(store, key, seed=i)
            elif op == "garble" and store.exists(key):
                store.path(key).write_bytes(b"\0" * 77)  # in place, header unreadable
        path = store.paths.snapshot()
        data = path.read_bytes()
        for kind, n in edits:
            if kind == "truncate":
                data = data[: n % max(1, len(data))]
            elif kind == "flip":
                data = _flip(data, n)
            else:
                try:
                    data = _reencode(data, lambda sn: _edit(sn, kind, n, universe))
                except Exception:
                    pass  # not decodable any more: the raw damage stands
        path.write_bytes(data)
        mgr = manager(store)
        assert_hits_are_true(store, mgr, universe)


def _edit(sn: Snapshot, kind: str, n: int, universe: list[bytes]) -> Snapshot:
    recs = list(sn.records)
    if not recs and kind != "ghost":
        return sn
    i = n % max(1, len(recs))
    if kind == "drop":
        del recs[i]
    elif kind == "size":
        recs[i] = msgspec.structs.replace(recs[i], size=n % 5000)
    elif kind == "mtime":
        recs[i] = msgspec.structs.replace(recs[i], mtime_ns=n)
    elif kind == "dup":
        recs.append(msgspec.structs.replace(recs[i], size=recs[i].size + 1))
    elif kind == "ghost":
        key = universe[n % len(universe)]
        recs.append(ChunkRecord(key, int.from_bytes(key[-4:], "big"), 32, 100 + n % 7, None, n))
    return msgspec.structs.replace(sn, records=recs)


# ---------------------------------------------------------------- the manager
def test_manager_starts_from_the_snapshot_without_reading_headers(tmp_path, monkeypatch):
    store, keys = make_store(tmp_path)
    first = manager(store)
    first.shutdown()  # writes the snapshot
    assert read_snapshot(store) is not None
    write_chunk(store, extra := make_key(b"\x42" * 16, 1), seed=5)  # stored by someone else

    def no_scan(*_a, **_k):
        raise AssertionError("full scan although the snapshot is valid")

    monkeypatch.setattr(ChunkStore, "scan", no_scan)
    second = manager(store)
    assert second.counters.get("startup_from_snapshot") == 1
    assert {e.key for e in second.index} == set(keys) | {extra}
    assert [r.key for r in second.index.records()][:len(keys)] == \
        [r.key for r in first.index.records()]  # recency survived
    assert_hits_are_true(store, second, keys + [extra])


def test_manager_with_snapshots_off_scans_and_writes_none(tmp_path, monkeypatch):
    store, keys = make_store(tmp_path, 2)
    write_snapshot(store, full_scan(store))
    store.delete(keys[0])
    scans = []
    real_scan = ChunkStore.scan
    monkeypatch.setattr(ChunkStore, "scan", lambda self, **k: scans.append(1) or real_scan(self))
    mtime = store.paths.snapshot().stat().st_mtime_ns
    mgr = manager(store, snapshot_interval=0)
    assert scans and keys[0] not in mgr.index
    mgr.take_events()
    mgr.shutdown()
    assert store.paths.snapshot().stat().st_mtime_ns == mtime


def test_manager_writes_snapshots_periodically(tmp_path):
    from hybridkv.vllm.manager import HybridKVManager

    store, keys = make_store(tmp_path, 2)
    now = [1000.0]
    mgr = HybridKVManager(store, HybridKVConfig(cache_dir=str(store.paths.cache_dir),
                                                snapshot_interval=60.0, refresh_interval=0),
                          clock=lambda: now[0])
    assert not store.paths.snapshot().exists()
    now[0] += 59.9
    list(mgr.take_events())  # not due yet
    mgr.cache.wait_for_snapshot()
    assert not store.paths.snapshot().exists()
    now[0] += 0.1
    list(mgr.take_events())  # due: written in the background
    mgr.cache.wait_for_snapshot()
    assert {r.key for r in read_snapshot(store).records} == set(keys)


def test_snapshot_writer_failure_is_logged_not_raised(tmp_path, caplog):
    store, _ = make_store(tmp_path, 1)
    clock = [0.0]
    writer = SnapshotWriter(store, 10.0, clock=lambda: clock[0])
    assert not writer.due()
    clock[0] = 10.0
    assert writer.due()
    store.paths.snapshot().mkdir()  # a directory where the file goes: the rename fails
    writer.start(full_scan(store))
    writer.wait()
    assert writer.failed == 1 and not writer.due()
    assert not writer.write(full_scan(store))
    assert any("cannot write index snapshot" in r.message for r in caplog.records)


@pytest.mark.parametrize("value", [-1, "300", True, float("nan"), float("inf"), None])
def test_snapshot_interval_is_validated(tmp_path, value):
    with pytest.raises(ConfigError, match="snapshot_interval"):
        HybridKVConfig.from_extra_config({"cache_dir": str(tmp_path),
                                          "snapshot_interval": value})


def test_snapshot_interval_default_and_zero(tmp_path):
    assert HybridKVConfig.from_extra_config({"cache_dir": str(tmp_path)}).snapshot_interval == 300
    assert HybridKVConfig.from_extra_config(
        {"cache_dir": str(tmp_path), "snapshot_interval": 0}).snapshot_interval == 0.0


def test_snapshot_module_imports_no_vllm():
    import subprocess
    import sys

    code = ("import sys, hybridkv.store.snapshot; "
            "assert not [m for m in sys.modules if m.startswith('vllm')]")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=Path(__file__).resolve().parents[2])
