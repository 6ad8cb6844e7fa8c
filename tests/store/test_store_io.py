"""Chunk I/O paths: read_into caller buffers, buffered vs O_DIRECT files, old files."""

from __future__ import annotations

import errno
import json
import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybridkv.groups import GroupKind, GroupSpec, HybridLayout
from hybridkv.keys import make_key
from hybridkv.store.chunk_store import ChunkStore
from hybridkv.store.direct import DIRECT_ALIGN, O_DIRECT, aligned_empty, direct_supported
from hybridkv.store.fileio import FileIO
from hybridkv.store.format import ChunkCorrupt, ChunkMissing, encode, ChunkHeader, FORMAT_VERSION
from hybridkv.keys import key_hex

pytestmark = pytest.mark.fast


def layout(page=96, blocks=2):
    return HybridLayout(model="io", dtype="bfloat16", groups=(
        GroupSpec(index=0, kind=GroupKind.FULL, block_tokens=16, chunk_tokens=16 * blocks,
                  layer_names=("a", "b", "c"), page_bytes=page),
        GroupSpec(index=1, kind=GroupKind.STATE, block_tokens=16 * blocks,
                  chunk_tokens=16 * blocks, layer_names=("m",), page_bytes=page * 5),
    ))


def arrays_for(store, group, rng, blocks=None):
    g = store.layout.group(group)
    n = g.blocks_per_chunk if blocks is None else blocks
    return [rng.integers(0, 256, (n, g.page_bytes), dtype=np.uint8) for _ in g.layer_names]




@pytest.fixture(params=["buffered", "direct"])
def store(request, tmp_path):
    if request.param == "direct" and not direct_supported(tmp_path):
        pytest.skip(f"{tmp_path} refuses O_DIRECT")
    s = ChunkStore(tmp_path, layout(), io_mode=request.param)
    s.ensure_dirs()
    return s


def test_read_into_returns_verified_views_into_the_callers_buffer(store):
    rng = np.random.default_rng(0)
    for group in (0, 1):
        key = make_key(bytes([7, group]) * 8, group)
        arrays = arrays_for(store, group, rng)
        written = store.write(key, position=32, block_offset=0, arrays=arrays)
        assert written == store.path(key).stat().st_size
        assert written <= store.max_file_bytes(group)
        assert store.max_file_bytes(group) % DIRECT_ALIGN == 0
        buf = aligned_empty(store.max_file_bytes(group))
        header, got = store.read_into(key, buf)
        base = buf.ctypes.data
        for arr, want in zip(got, arrays):
            assert base <= arr.ctypes.data < base + buf.nbytes, "not a view into buf"
            assert np.array_equal(arr, want)
        assert header.num_blocks == arrays[0].shape[0]
        _, again = store.read(key)
        assert all(np.array_equal(a, b) for a, b in zip(again, arrays))


def test_direct_mode_files_are_page_multiples_and_valid_safetensors(tmp_path):
    if not direct_supported(tmp_path):
        pytest.skip("no O_DIRECT here")
    from safetensors import safe_open

    s = ChunkStore(tmp_path, layout(), io_mode="direct")
    s.ensure_dirs()
    arrays = arrays_for(s, 0, np.random.default_rng(1))
    key = make_key(b"d" * 16, 0)
    s.write(key, position=32, block_offset=0, arrays=arrays)
    assert s.path(key).stat().st_size % DIRECT_ALIGN == 0
    assert not s.io.direct_refused
    with safe_open(str(s.path(key)), framework="numpy") as f:
        assert np.array_equal(f.get_tensor("layer.2"), arrays[2])
    # a buffered store reads it, and a direct store reads buffered files
    b = ChunkStore(tmp_path, layout())
    assert np.array_equal(b.read(key)[1][0], arrays[0])
    key2 = make_key(b"e" * 16, 0)
    b.write(key2, position=32, block_offset=0, arrays=arrays)
    assert b.path(key2).stat().st_size % DIRECT_ALIGN != 0
    assert np.array_equal(s.read_into(key2, aligned_empty(s.max_file_bytes(0)))[1][1], arrays[1])


def test_read_into_accepts_any_writable_buffer_and_refuses_small_or_readonly(store):
    rng = np.random.default_rng(2)
    key = make_key(b"u" * 16, 0)
    arrays = arrays_for(store, 0, rng)
    store.write(key, position=32, block_offset=0, arrays=arrays)
    n = store.max_file_bytes(0)
    unaligned = np.zeros(n + 1, dtype=np.uint8)[1:]  # not page aligned: buffered read
    assert np.array_equal(store.read_into(key, unaligned)[1][2], arrays[2])
    assert np.array_equal(store.read_into(key, bytearray(n))[1][0], arrays[0])
    torch = pytest.importorskip("torch")
    t = torch.empty(n, dtype=torch.uint8)
    assert np.array_equal(store.read_into(key, t.numpy())[1][1], arrays[1])
    with pytest.raises(ValueError):
        store.read_into(key, np.zeros(64, dtype=np.uint8))
    with pytest.raises(ValueError):
        store.read_into(key, bytes(n))
    assert store.path(key).exists(), "a caller's mistake must not quarantine the file"


def test_write_accepts_views_of_pinned_or_strided_memory(store):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    g = store.layout.group(0)
    src = torch.from_numpy(rng.integers(0, 256, (8, 2 * g.page_bytes), dtype=np.uint8))
    host = src.pin_memory() if torch.cuda.is_available() else src
    arrays = [host.numpy()[i * 2:i * 2 + 2, :g.page_bytes] for i in range(3)]  # strided views
    key = make_key(b"p" * 16, 0)
    store.write(key, position=32, block_offset=0, arrays=arrays)
    _, got = store.read(key)
    assert all(np.array_equal(a, b) for a, b in zip(got, arrays))


def test_file_larger_than_any_chunk_of_its_group_is_corrupt(store):
    key = make_key(b"L" * 16, 0)
    store.write(key, position=32, block_offset=0, arrays=arrays_for(store, 0,
                                                                     np.random.default_rng(4)))
    with open(store.path(key), "ab") as f:
        f.write(b"\0" * store.max_file_bytes(0))
    with pytest.raises(ChunkCorrupt, match="exceeds"):
        store.read(key)
    assert not store.path(key).exists()
    with pytest.raises(ChunkMissing):
        store.read(key)


def test_files_of_the_previous_writer_still_read(tmp_path):
    """Files written by the 0.x encoder (8-byte padded header, per-buffer writes)."""
    s = ChunkStore(tmp_path, layout())
    s.ensure_dirs()
    arrays = arrays_for(s, 0, np.random.default_rng(5))
    key = make_key(b"o" * 16, 0)
    g = s.layout.group(0)
    header = ChunkHeader(version=FORMAT_VERSION, fingerprint=s.fingerprint, key=key_hex(key),
                         group=0, kind=g.kind.value, position=32, chunk_tokens=g.chunk_tokens,
                         block_offset=0, num_blocks=2, page_bytes=(g.page_bytes,) * 3,
                         layer_names=g.layer_names)
    s.path(key).parent.mkdir(parents=True, exist_ok=True)
    s.path(key).write_bytes(b"".join(bytes(b) for b in encode(header, arrays)))
    _, got = s.read(key)
    assert all(np.array_equal(a, b) for a, b in zip(got, arrays))


def test_tensor_table_other_than_back_to_back_is_corrupt(store):
    """Swapped offsets would pass a per-layer checksum of the same bytes; refuse them."""
    key = make_key(b"t" * 16, 0)
    store.write(key, position=32, block_offset=0, arrays=arrays_for(store, 0,
                                                                     np.random.default_rng(6)))
    data = store.path(key).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    table = json.loads(data[8:8 + n])
    table["layer.0"]["data_offsets"], table["layer.1"]["data_offsets"] = (
        table["layer.1"]["data_offsets"], table["layer.0"]["data_offsets"])
    raw = json.dumps(table, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    store.path(key).write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    with pytest.raises(ChunkCorrupt, match="layer 0"):
        store.read(key)


@pytest.mark.skipif(not O_DIRECT, reason="no O_DIRECT on this platform")
def test_einval_from_o_direct_falls_back_to_buffered_and_says_so(tmp_path, monkeypatch, caplog):
    """tmpfs (before Linux 6.6), overlayfs and some NFS mounts answer EINVAL."""
    io = FileIO(io_mode="direct")
    s = ChunkStore(tmp_path, layout(), io=io)
    s.ensure_dirs()
    real_open = os.open

    def refusing_open(path, flags, *args, **kw):
        if flags & O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", refusing_open)
    arrays = arrays_for(s, 0, np.random.default_rng(7))
    key = make_key(b"f" * 16, 0)
    with caplog.at_level("WARNING"):
        s.write(key, position=32, block_offset=0, arrays=arrays)
    assert io.direct_refused and "refuses O_DIRECT" in caplog.text
    assert not io.direct
    _, got = s.read(key)
    assert all(np.array_equal(a, b) for a, b in zip(got, arrays))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mode=st.sampled_from(["buffered", "direct"]), blocks=st.integers(1, 2),
       page=st.integers(1, 9000), group=st.integers(0, 1), data=st.data())
def test_roundtrip_any_page_size_and_mode(tmp_path_factory, mode, blocks, page, group, data):
    root = tmp_path_factory.mktemp("rt")
    if mode == "direct" and not direct_supported(root):
        mode = "buffered"
    s = ChunkStore(root, layout(page=page), io_mode=mode)
    s.ensure_dirs()
    g = s.layout.group(group)
    n = min(blocks, g.blocks_per_chunk)
    seed = data.draw(st.integers(0, 2**32 - 1))
    arrays = arrays_for(s, group, np.random.default_rng(seed), blocks=n)
    key = make_key(seed.to_bytes(8, "big"), group)
    size = s.write(key, position=32, block_offset=0, arrays=arrays)
    assert size <= s.max_file_bytes(group)
    _, got = s.read_into(key, aligned_empty(s.max_file_bytes(group)))
    assert all(np.array_equal(a, b) for a, b in zip(got, arrays))
    flip = data.draw(st.integers(0, size - 1))
    raw = bytearray(s.path(key).read_bytes())
    raw[flip] ^= 0x01
    s.path(key).write_bytes(bytes(raw))
    # a flipped bit in the header's padding or in a JSON space may be harmless; the
    # payload must never come back altered
    try:
        _, got = s.read(key)
    except (ChunkCorrupt, ChunkMissing):
        return
    assert all(np.array_equal(a, b) for a, b in zip(got, arrays))


def test_zero_copy_direct_store_from_aligned_pages(tmp_path):
    """Aligned whole pages (a KV cache's) go to disk without the staging copy; the header
    then fills whole pages, so the payload starts page-aligned in the file."""
    if not direct_supported(tmp_path):
        pytest.skip("no O_DIRECT here")
    s = ChunkStore(tmp_path, layout(page=4096, blocks=2), io_mode="direct")
    s.ensure_dirs()
    kv = aligned_empty(3 * 2 * 4096)
    kv[:] = np.random.default_rng(8).integers(0, 256, kv.nbytes, dtype=np.uint8)
    arrays = [kv[i * 8192:(i + 1) * 8192].reshape(2, 4096) for i in range(3)]
    key = make_key(b"z" * 16, 0)
    size = s.write(key, position=32, block_offset=0, arrays=arrays)
    data = s.path(key).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert size == len(data) and (8 + n) % DIRECT_ALIGN == 0 and len(data) % DIRECT_ALIGN == 0
    assert data[8 + n:] == kv.tobytes()
    _, got = s.read_into(key, aligned_empty(s.max_file_bytes(0)))
    assert all(np.array_equal(a, b) for a, b in zip(got, arrays))


def test_fast_path_string_is_the_path(tmp_path):
    s = ChunkStore(tmp_path, layout(), rank=3)
    for g in (0, 1):
        key = make_key(bytes(range(32)), g)
        assert s.paths.chunk_str(key) == str(s.path(key))


@pytest.mark.parametrize("keyed", [False, True])
def test_large_buffered_chunk_is_hashed_piece_by_piece_as_written(tmp_path, keyed, monkeypatch):
    """Chunks above 1 MiB stream: payload pieces first (hashed right before each write),
    the head last at offset 0; the file is the same safetensors file."""
    from safetensors import safe_open

    s = ChunkStore(tmp_path, layout(page=300_000, blocks=2),
                   integrity_key=b"s" * 32 if keyed else None)
    s.ensure_dirs()
    arrays = arrays_for(s, 0, np.random.default_rng(9))  # 3 layers x 2 x 300 KB = 1.8 MB
    key = make_key(b"S" * 16, 0)
    calls = []
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, b, off: calls.append(off) or real(fd, b, off))
    size = s.write(key, position=32, block_offset=0, arrays=arrays)
    assert len(calls) > 3 and calls[-1] == 0 and calls[0] > 0  # pieces, then the head
    assert size == s.path(key).stat().st_size
    header, got = s.read(key)
    assert all(np.array_equal(a, b) for a, b in zip(got, arrays))
    assert bool(header.tag) == keyed
    with safe_open(str(s.path(key)), framework="numpy") as f:
        assert np.array_equal(f.get_tensor("layer.1"), arrays[1])


def test_large_buffered_chunk_failing_mid_write_leaves_nothing(tmp_path, monkeypatch):
    s = ChunkStore(tmp_path, layout(page=300_000, blocks=2))
    s.ensure_dirs()
    real = os.pwrite
    state = {"n": 0}

    def enospc_on_third(fd, b, off):
        state["n"] += 1
        if state["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, b, off)

    monkeypatch.setattr(os, "pwrite", enospc_on_third)
    key = make_key(b"N" * 16, 0)
    with pytest.raises(OSError):
        s.write(key, position=32, block_offset=0, arrays=arrays_for(s, 0, np.random.default_rng(10)))
    assert not s.path(key).exists()
    assert [f for _, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".tmp")] == []


@pytest.mark.parametrize("rule", [{"op": "write", "errno": "ENOSPC", "partial": True},
                                  {"op": "write", "partial": True, "delay": 0.01}])
def test_fault_hooks_reach_streamed_writes(tmp_path, rule):
    """FileIO's write hook runs for streamed (large buffered) chunks too: a fault
    leaves nothing, a slow half-written temp file still ends as a whole chunk."""
    from hybridkv.testing.faults import FaultyFileIO, parse_rules

    ChunkStore(tmp_path, layout(page=300_000, blocks=2)).ensure_dirs()
    io = FaultyFileIO(parse_rules([rule]))
    s = ChunkStore(tmp_path, layout(page=300_000, blocks=2), io=io)
    key = make_key(b"F" * 16, 0)
    arrays = arrays_for(s, 0, np.random.default_rng(11))
    if "errno" in rule:
        with pytest.raises(OSError) as err:
            s.write(key, position=32, block_offset=0, arrays=arrays)
        assert err.value.errno == errno.ENOSPC and not s.path(key).exists()
    else:
        assert s.write(key, position=32, block_offset=0, arrays=arrays) == \
            s.path(key).stat().st_size
        _, got = s.read(key)
        assert all(np.array_equal(a, b) for a, b in zip(got, arrays))
    assert io._rules[0].fired == 1
    assert [f for _, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".tmp")] == []
