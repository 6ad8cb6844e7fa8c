"""vLLM's KV-event wire format (``vllm/distributed/kv_events.py``), decoded without vLLM.

An engine publishes ZMQ multipart messages ``(topic, seq, payload)``: ``seq`` is
an 8-byte big-endian counter starting at 0 per publisher; ``payload`` is a
msgpack ``KVEventBatch``: an array ``[ts, events, data_parallel_rank]`` (the
rank is omitted when None). Each event is a map tagged ``"type"``
(``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared``) whose default
fields are omitted. The Structs below mirror vLLM 0.32's field names, order,
defaults and tags exactly; ``tests/routing/test_routing_events.py`` decodes vLLM's own
encoder output with them (and encodes with them for vLLM's decoder).

Block hashes are ``bytes`` (a full digest) or ``int`` (the digest's low 64
bits, vLLM's default ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``);
``hash_key`` maps both to the same int so the index needs no setting for it.
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["BlockStored", "BlockRemoved", "AllBlocksCleared", "KVEventBatch", "Event",
           "MEDIUM_GPU", "MEDIUM_CPU", "MEDIUM_STORAGE", "decode_batch", "decode_seq",
           "encode_batch", "hash_key", "EventDecodeError"]

MEDIUM_GPU = "GPU"
MEDIUM_CPU = "CPU"
MEDIUM_STORAGE = "STORAGE"

ExternalBlockHash = bytes | int
_MASK64 = (1 << 64) - 1


class _Event(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    """Base of the tagged events (tag = class name, field ``type``)."""


class BlockStored(_Event):
    block_hashes: list[ExternalBlockHash]
    parent_block_hash: ExternalBlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class BlockRemoved(_Event):
    block_hashes: list[ExternalBlockHash]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(_Event):
    pass


Event = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Event]
    data_parallel_rank: int | None = None


class EventDecodeError(ValueError):
    """A message that is not a vLLM KV-event batch."""


_decoder = msgspec.msgpack.Decoder(KVEventBatch)
_encoder = msgspec.msgpack.Encoder()


def decode_batch(payload: bytes) -> KVEventBatch:
    try:
        return _decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise EventDecodeError(f"not a KV-event batch: {exc}") from None


def decode_seq(frame: bytes) -> int:
    if len(frame) != 8:
        raise EventDecodeError(f"sequence frame has {len(frame)} bytes, expected 8")
    return int.from_bytes(frame, "big", signed=True)


def encode_batch(batch: KVEventBatch) -> bytes:
    return _encoder.encode(batch)


def hash_key(block_hash: ExternalBlockHash) -> int:
    """The int an engine publishes for ``block_hash`` with int hashes on (low 64 bits)."""
    if isinstance(block_hash, int):
        return block_hash & _MASK64
    return int.from_bytes(block_hash, "big") & _MASK64
