"""The chunk store: self-describing files, verified reads, atomic writes, scans."""

from __future__ import annotations

import json
import os
import struct

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridkv.groups import GroupKind, GroupSpec, HybridLayout
from hybridkv.index import ChunkIndex
from hybridkv.keys import key_from_hex, key_hex, make_key
from hybridkv.store.chunk_store import ChunkStore
from hybridkv.store.file_map import tmp_name_prefix
from hybridkv.store.fileio import FileIO
from hybridkv.store.format import (
    FORMAT_VERSION,
    ChunkCorrupt,
    ChunkMissing,
    ChunkTooNew,
)

pytestmark = pytest.mark.fast


def layout(model="tiny", page=64):
    return HybridLayout(model=model, dtype="bfloat16", groups=(
        GroupSpec(index=0, kind=GroupKind.FULL, block_tokens=16, chunk_tokens=32,
                  layer_names=("l0", "l3"), page_bytes=page),
        GroupSpec(index=1, kind=GroupKind.SLIDING, block_tokens=16, chunk_tokens=32,
                  layer_names=("l1", "l2"), page_bytes=page, window_tokens=40),
        GroupSpec(index=2, kind=GroupKind.STATE, block_tokens=16, chunk_tokens=32,
                  layer_names=("m4",), page_bytes=page * 3),
    ))


def pages(rng, blocks, sizes):
    return [rng.integers(0, 256, (blocks, s), dtype=np.uint8) for s in sizes]


@pytest.fixture
def store(tmp_path):
    s = ChunkStore(tmp_path, layout())
    s.ensure_dirs()
    return s


def test_roundtrip_every_group_and_header_fields(store):
    rng = np.random.default_rng(0)
    for group, sizes in ((0, (64, 64)), (1, (64, 64)), (2, (192,))):
        key = make_key(bytes([group]) * 16, group)
        arrays = pages(rng, 2 if group < 2 else 1, sizes)
        assert store.write(key, position=64, block_offset=0, arrays=arrays,
                           parent=make_key(b"p" * 16, group)) > 0
        header, got = store.read(key)
        assert header.version == FORMAT_VERSION and header.group == group
        assert header.kind == store.layout.group(group).kind.value
        assert header.position == 64 and header.chunk_tokens == 32
        assert header.layer_names == store.layout.group(group).layer_names
        assert header.parent == key_hex(make_key(b"p" * 16, group))
        assert all((a == b).all() for a, b in zip(got, arrays))
    assert store.paths.layout_file.exists()


def test_write_is_dedup_and_path_is_pure_function(tmp_path):
    a = ChunkStore(tmp_path, layout())
    b = ChunkStore(tmp_path, layout())
    key = make_key(b"k" * 16, 1)
    assert a.path(key) == b.path(key)
    assert a.path(key).is_relative_to(tmp_path / layout().fingerprint / "r0" / "g1")
    rng = np.random.default_rng(1)
    assert a.write(key, position=32, block_offset=0, arrays=pages(rng, 1, (64, 64))) > 0
    assert b.write(key, position=32, block_offset=0, arrays=pages(rng, 1, (64, 64))) == 0


def test_fingerprint_separates_layouts(tmp_path):
    assert layout("a").fingerprint != layout("b").fingerprint
    assert layout(page=64).fingerprint != layout(page=128).fingerprint
    assert layout().fingerprint == layout().fingerprint


@pytest.mark.parametrize("damage", ["bitflip", "truncate", "header", "empty", "other_key"])
def test_damaged_file_is_corrupt_and_quarantined(store, damage):
    rng = np.random.default_rng(2)
    key = make_key(b"d" * 16, 0)
    store.write(key, position=32, block_offset=0, arrays=pages(rng, 2, (64, 64)))
    path = store.path(key)
    data = bytearray(path.read_bytes())
    if damage == "bitflip":
        data[-5] ^= 0x10
    elif damage == "truncate":
        data = data[: len(data) - 7]
    elif damage == "header":
        (n,) = struct.unpack("<Q", data[:8])
        hdr = json.loads(data[8:8 + n])
        meta = json.loads(hdr["__metadata__"]["hybridkv"])
        meta["fingerprint"] = "0" * 16
        hdr["__metadata__"]["hybridkv"] = json.dumps(meta)
        raw = json.dumps(hdr).encode()
        raw += b" " * (-len(raw) % 8)
        data = bytearray(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    elif damage == "empty":
        data = bytearray()
    elif damage == "other_key":
        other = make_key(b"o" * 16, 0)
        store.write(other, position=32, block_offset=0, arrays=pages(rng, 2, (64, 64)))
        data = bytearray(store.path(other).read_bytes())
    path.write_bytes(bytes(data))
    with pytest.raises(ChunkCorrupt):
        store.read(key)
    assert not path.exists()
    assert list(store.paths.quarantine_dir.iterdir())
    with pytest.raises(ChunkMissing):
        store.read(key)


def test_future_format_version_is_refused(store):
    rng = np.random.default_rng(3)
    key = make_key(b"f" * 16, 0)
    store.write(key, position=32, block_offset=0, arrays=pages(rng, 2, (64, 64)))
    path = store.path(key)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    hdr = json.loads(data[8:8 + n])
    meta = json.loads(hdr["__metadata__"]["hybridkv"])
    meta["version"] = FORMAT_VERSION + 1
    hdr["__metadata__"]["hybridkv"] = json.dumps(meta)
    raw = json.dumps(hdr).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    with pytest.raises(ChunkTooNew, match="newer"):
        store.read(key)
    assert path.exists(), "a newer reader's file must not be quarantined"
    with pytest.raises(ChunkTooNew, match="newer"):
        list(store.scan())


class _FailingIO(FileIO):
    """ENOSPC half way through a file, whichever write path the store takes."""

    def _write_all(self, fd, view):
        os.write(fd, bytes(view[: len(view) // 2]))
        raise OSError(28, "No space left on device")

    def _write_buffers(self, fd, views):
        self._write_all(fd, views[-1])


def test_failed_write_leaves_nothing_visible(tmp_path):
    ChunkStore(tmp_path, layout()).ensure_dirs()
    s = ChunkStore(tmp_path, layout(), io=_FailingIO())
    key = make_key(b"e" * 16, 0)
    with pytest.raises(OSError):
        s.write(key, position=32, block_offset=0,
                arrays=pages(np.random.default_rng(4), 2, (64, 64)))
    assert not s.path(key).exists()
    leftovers = [f for _, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".tmp")]
    assert leftovers == []


def test_stale_temp_files_are_cleaned(store):
    gdir = store.paths.group_dir(0) / "ab"
    gdir.mkdir(parents=True)
    host = tmp_name_prefix().split(".")[1]
    dead = gdir / f".{host}.999999999.1.x.safetensors.tmp"
    alive = gdir / f".{host}.{os.getpid()}.2.y.safetensors.tmp"
    dead.write_bytes(b"x")
    alive.write_bytes(b"y")
    assert store.clean_temp() == 1
    assert not dead.exists() and alive.exists()


def test_file_map_spells_each_name_once(store):
    from hybridkv.store.file_map import (
        Leaf,
        chunk_name,
        chunk_names,
        is_stale_temp,
        key_of_name,
        placed_names,
        temp_path,
    )

    keys = [make_key(bytes([i]) * 16, i % 3) for i in range(5)]
    assert chunk_names(keys) == [chunk_name(k) for k in keys] == [store.path(k).name
                                                                  for k in keys]
    assert [key_of_name(n) for n in chunk_names(keys)] == keys
    for bad in (".x.safetensors", "zz.safetensors", chunk_name(keys[0]) + ".tmp"):
        with pytest.raises(ValueError):
            key_of_name(bad)
    assert all(store.paths.chunk_str(k) == str(store.path(k)) for k in keys)
    key = keys[1]  # group 1, first byte 01
    tmp = temp_path(store.path(key))
    assert tmp.parent == store.path(key).parent and tmp.name.startswith(tmp_name_prefix())
    tmp.parent.mkdir(parents=True)
    tmp.write_bytes(b"t")
    assert not is_stale_temp(str(tmp)) and is_stale_temp(str(tmp), max_age=-1)
    leaf = Leaf(1, "01", str(tmp.parent))
    misplaced = "00" + chunk_name(key)[2:]
    assert placed_names(leaf, [chunk_name(key)]) == ([chunk_name(key)], [])
    assert placed_names(leaf, [chunk_name(key), misplaced, tmp.name]) == \
        ([chunk_name(key)], [str(tmp)])
    assert placed_names(Leaf(0, "01", leaf.path), [chunk_name(key)]) == ([], [])


def test_scan_rebuilds_index_with_parents(store):
    rng = np.random.default_rng(5)
    parent = make_key(b"a" * 16, 0)
    child = make_key(b"b" * 16, 0)
    store.write(parent, position=32, block_offset=0, arrays=pages(rng, 2, (64, 64)))
    store.write(child, position=64, block_offset=0, arrays=pages(rng, 2, (64, 64)), parent=parent)
    (store.paths.group_dir(0) / "zz").mkdir()
    (store.paths.group_dir(0) / "zz" / "not-a-key.safetensors").write_bytes(b"junk")
    index = ChunkIndex.from_records(store.scan())
    assert {e.key for e in index} == {parent, child}
    assert index.get(child).parent == parent
    assert child in index.get(parent).children
    assert index.bytes_stored == sum(store.path(k).stat().st_size for k in (parent, child))


def test_file_mode_default_is_private(store):
    key = make_key(b"m" * 16, 0)
    store.write(key, position=32, block_offset=0,
                arrays=pages(np.random.default_rng(6), 2, (64, 64)))
    assert store.path(key).stat().st_mode & 0o777 == 0o600


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.integers(0, 2**32 - 1))
def test_key_hex_roundtrip(h, g):
    key = make_key(h, g)
    text = key_hex(key)
    assert key_from_hex(text) == key and "/" not in text


@pytest.mark.parametrize("bad", ["../../etc", "zz", "", "ABCDEF0011", "00" * 3])
def test_key_from_hex_rejects_non_keys(bad):
    with pytest.raises(ValueError):
        key_from_hex(bad)


def test_layout_json_is_readable(store):
    doc = msgspec.json.decode(store.paths.layout_file.read_bytes())
    assert doc["fingerprint"] == store.fingerprint
    assert [g["kind"] for g in doc["layout"]["groups"]] == ["full_attention", "sliding_window",
                                                            "state"]


def test_chunk_files_open_with_the_safetensors_library(store):
    from safetensors import safe_open

    arrays = pages(np.random.default_rng(7), 2, (64, 64))
    key = make_key(b"s" * 16, 0)
    store.write(key, position=32, block_offset=0, arrays=arrays)
    with safe_open(str(store.path(key)), framework="numpy") as f:
        assert json.loads(f.metadata()["hybridkv"])["key"] == key_hex(key)
        assert (f.get_tensor("layer.1") == arrays[1]).all()
