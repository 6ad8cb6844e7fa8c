"""Tamper-proof shared caches: keyed tags, forged files, the key file's checks."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import xxhash

from hybridkv.config import ConfigError, HybridKVConfig
from hybridkv.groups import GroupKind, GroupSpec, HybridLayout
from hybridkv.keys import make_key
from hybridkv.store.chunk_store import ChunkStore
from hybridkv.store.direct import aligned_empty
from hybridkv.store.format import ChunkCorrupt, ChunkMissing, ChunkUntrusted
from hybridkv.store.integrity import load_key

pytestmark = pytest.mark.fast

KEY = b"k" * 32
LAYOUT = HybridLayout(model="sec", dtype="bfloat16", groups=(
    GroupSpec(index=0, kind=GroupKind.FULL, block_tokens=16, chunk_tokens=32,
              layer_names=("a", "b"), page_bytes=64),))


def arrays(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (2, 64), dtype=np.uint8) for _ in range(2)]


def keyed(tmp_path, key=KEY, **kw):
    s = ChunkStore(tmp_path, LAYOUT, integrity_key=key, **kw)
    s.ensure_dirs()
    return s


def rewrite(path, edit_meta=None, edit_payload=None, fix_checksum=True):
    """An attacker's edit: change header fields / payload, recompute the xxh3 checksum."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    table = json.loads(data[8:8 + n])
    meta = json.loads(table["__metadata__"]["hybridkv"])
    payload = bytearray(data[8 + n:])
    if edit_payload:
        edit_payload(payload)
    if edit_meta:
        edit_meta(meta)
    if fix_checksum:
        meta["checksum"] = xxhash.xxh3_64_hexdigest(bytes(payload))
    table["__metadata__"]["hybridkv"] = json.dumps(meta)
    raw = json.dumps(table).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(payload))


def assert_never_served(store, key):
    with pytest.raises(ChunkUntrusted):
        store.read(key)
    assert not store.path(key).exists(), "an untrusted file must be quarantined"
    assert list(store.paths.quarantine_dir.iterdir())
    with pytest.raises(ChunkMissing):
        store.read_into(key, aligned_empty(store.max_file_bytes(0)))


@pytest.mark.parametrize("mode", ["buffered", "direct"])
def test_keyed_store_roundtrip_and_keyless_readers_ignore_the_tag(tmp_path, mode):
    s = keyed(tmp_path, io_mode=mode)
    key = make_key(b"r" * 16, 0)
    s.write(key, position=32, block_offset=0, arrays=arrays())
    header, got = s.read(key)
    assert len(header.tag) == 64
    assert all(np.array_equal(a, b) for a, b in zip(got, arrays()))
    _, plain = ChunkStore(tmp_path, LAYOUT).read(key)
    assert all(np.array_equal(a, b) for a, b in zip(plain, arrays()))


def test_forged_file_with_valid_checksum_and_no_tag_is_never_served(tmp_path):
    """Someone with write access but no key plants a chunk (a correct xxh3, no tag)."""
    s = keyed(tmp_path)
    key = make_key(b"f" * 16, 0)
    ChunkStore(tmp_path, LAYOUT).write(key, position=32, block_offset=0, arrays=arrays(1))
    header = ChunkStore(tmp_path, LAYOUT).read(key)[0]  # the checksum is right
    assert header.checksum and not header.tag
    assert_never_served(s, key)


def test_file_tagged_with_another_key_is_never_served(tmp_path):
    key = make_key(b"o" * 16, 0)
    keyed(tmp_path, key=b"x" * 32).write(key, position=32, block_offset=0, arrays=arrays(2))
    assert_never_served(keyed(tmp_path), key)


@pytest.mark.parametrize("edit", ["payload", "position", "parent", "drop_tag", "fake_tag"])
def test_edits_to_a_tagged_file_are_never_served(tmp_path, edit):
    s = keyed(tmp_path)
    key = make_key(b"e" * 16, 0)
    s.write(key, position=32, block_offset=0, arrays=arrays(3))

    def payload(p):
        p[5] ^= 0xFF

    edits = {
        "payload": dict(edit_payload=payload),
        "position": dict(edit_meta=lambda m: m.update(position=64)),
        "parent": dict(edit_meta=lambda m: m.update(parent="ab" * 20)),
        "drop_tag": dict(edit_meta=lambda m: m.update(tag="")),
        "fake_tag": dict(edit_meta=lambda m: m.update(tag="0" * 64)),
    }
    rewrite(s.path(key), **edits[edit])
    ChunkStore(tmp_path, LAYOUT).read(key)  # xxh3 alone cannot tell: a keyless reader serves it
    assert_never_served(s, key)


def test_damage_is_still_corrupt_not_untrusted(tmp_path):
    s = keyed(tmp_path)
    key = make_key(b"d" * 16, 0)
    s.write(key, position=32, block_offset=0, arrays=arrays(4))
    rewrite(s.path(key), edit_payload=lambda p: p.__setitem__(0, p[0] ^ 1), fix_checksum=False)
    with pytest.raises(ChunkCorrupt) as info:
        s.read(key)
    assert not isinstance(info.value, ChunkUntrusted)


def _key_file(directory, name, content=KEY, mode=0o600):
    p = directory / name
    p.write_bytes(content)
    os.chmod(p, mode)
    return p


def test_config_accepts_a_private_key_file_and_refuses_bad_ones(tmp_path):
    good = _key_file(tmp_path, "good.key")
    c = HybridKVConfig.from_extra_config({"cache_dir": str(tmp_path / "c"),
                                          "integrity_key_file": str(good), "io_mode": "direct"})
    assert c.integrity_key == KEY and c.io_mode == "direct"
    _key_file(tmp_path, "group.key", mode=0o640)  # group-readable: allowed
    assert HybridKVConfig.from_extra_config({
        "cache_dir": "x", "integrity_key_file": str(tmp_path / "group.key")}).integrity_key == KEY
    with pytest.raises(ConfigError, match="integrity_key_file: expected a path"):
        HybridKVConfig.from_extra_config({"cache_dir": "x", "integrity_key_file": 42})
    assert HybridKVConfig.from_extra_config({"cache_dir": "x"}).integrity_key is None
    cases = {
        "does not exist": tmp_path / "nope.key",
        "fewer than 16": _key_file(tmp_path, "empty.key", b""),
        "readable or writable by every user": _key_file(tmp_path, "open.key", mode=0o644),
        "not a regular file": tmp_path,
    }
    for why, path in cases.items():
        c = HybridKVConfig.from_extra_config({"cache_dir": "x", "integrity_key_file": str(path)})
        with pytest.raises(ConfigError) as info:
            c.integrity_key  # what the engine reads at start
        msg = str(info.value)
        assert msg.startswith("integrity_key_file: ") and why in msg and str(path) in msg, msg
        assert "\n" not in msg
    with pytest.raises(ConfigError, match="io_mode"):
        HybridKVConfig.from_extra_config({"cache_dir": "x", "io_mode": "mmap"})
    with pytest.raises(ValueError, match="fewer than 16"):
        load_key(_key_file(tmp_path, "short.key", b"short"))


def test_worker_counts_an_untrusted_chunk_and_keeps_it_out_of_the_kv_cache(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("vllm")
    from vllm.v1.kv_offload.base import (
        CanonicalKVCacheRef,
        CanonicalKVCaches,
        CanonicalKVCacheTensor,
        GPULoadStoreSpec,
    )

    from hybridkv.vllm.transfer import ChunkLoadSpec
    from hybridkv.vllm.worker import HybridKVWorker

    key = make_key(b"w" * 16, 0)
    planted = arrays(5)
    ChunkStore(tmp_path, LAYOUT).write(key, position=32, block_offset=0, arrays=planted)
    store = keyed(tmp_path)
    tensors = [torch.zeros((16, 64), dtype=torch.int8) for _ in range(2)]
    caches = CanonicalKVCaches(
        tensors=[CanonicalKVCacheTensor(t, 64) for t in tensors],
        group_data_refs=[[CanonicalKVCacheRef(0, 64), CanonicalKVCacheRef(1, 64)]])
    worker = HybridKVWorker(store, caches, [0], blocks_per_chunk=2)
    try:
        worker.submit_load(1, ChunkLoadSpec([key]), GPULoadStoreSpec([7, 8], [2], [0]))
        worker.wait({1})
        worker.get_finished()
        assert worker.take_failed_loads() == {1}
        assert all(not t[7:9].any() for t in tensors), "a forged chunk reached the KV cache"
        assert worker.counters.get("load_failures_ChunkUntrusted") == 1
    finally:
        worker.shutdown()


def test_scheduler_level_key_and_direct_mode_serve_hits_and_refuse_a_planted_chunk(tmp_path):
    """Through vLLM's scheduler and the connector (tests/harness.py): with
    ``integrity_key_file`` and ``io_mode="direct"`` set in kv_connector_extra_config, a
    restart gets its hits; a chunk planted by a keyless writer (valid xxh3, no tag) is
    refused at load: the request is recomputed, never fed the planted bytes."""
    pytest.importorskip("vllm")
    import harness as H
    from harness import PROMPTS, first_run, jamba_specs, oracle_hit

    key_file = tmp_path / "cache.key"
    key_file.write_bytes(KEY)
    key_file.chmod(0o600)
    model_dir = H.write_tiny_model(tmp_path / "model")
    specs, block = jamba_specs()
    cache = tmp_path / "kv"

    def make(**settings):
        config = H.make_vllm_config(model_dir, cache, block_size=block,
                                    max_num_batched_tokens=64, snapshot_interval=0,
                                    **settings)
        return H.Engine(config, specs)

    keyed_settings = dict(integrity_key_file=str(key_file), io_mode="direct")
    first_run(lambda: make(**keyed_settings))
    files = [Path(d) / f for d, _, fs in os.walk(cache) for f in fs if f.endswith(".safetensors")]
    assert files and all(f.stat().st_size % 4096 == 0 for f in files)  # written for O_DIRECT
    e = make(**keyed_settings)
    prompt = PROMPTS["a"]
    hit = oracle_hit(e, prompt)
    assert hit > 0
    e.serve({"a": prompt})
    assert e.external_tokens["a"] == e.start_tokens["a"] == hit
    (load,) = [ld for ld in e.loads if ld.req_id == "a"]
    assert load.verified  # the loaded bytes equal what the model would compute
    e.shutdown()

    # a keyless writer replaces one chunk c needs with its own (a valid xxh3, no tag)
    e = make(**keyed_settings)
    prompt = PROMPTS["c"]
    hit = oracle_hit(e, prompt)
    mamba = next(g for g in e.groups if g.kind == "state")
    victim = e.chunk_path(prompt, mamba.gid, hit)
    store = e.store
    key = e.chunk_key(prompt, mamba.gid, hit)
    _, arrays = store.read(key)
    victim.unlink()
    forged = [np.full_like(a, 7) for a in arrays]
    ChunkStore(store.paths.cache_dir, store.layout, rank=store.paths.rank).write(
        key, position=hit, block_offset=0, arrays=forged)
    assert victim.exists()
    e.serve({"c": prompt})
    assert e.external_tokens["c"] == hit  # the index listed the chunk...
    assert e.start_tokens["c"] == 0  # ...its load was refused and c was recomputed
    counters = e.worker.connector_worker.worker.counters
    assert counters.get("load_failures_ChunkUntrusted") == 1
    e.shutdown()
