"""Chunk keys: which prefix, which group.

A ``ChunkKey`` is byte-identical to vLLM's ``OffloadKey``: the request's chained
prefix hash at the chunk's last hash boundary, followed by the group index as
4 big-endian bytes. The core never interprets the hash; it only compares keys.

Invariants:
- ``key_from_hex(key_hex(k)) == k`` for every key; the hex form is the only
  form that ever reaches a file name, so a key can never escape its directory.
"""

from __future__ import annotations

import binascii
import re
from typing import NewType

__all__ = [
    "ChunkKey",
    "make_key",
    "key_hash",
    "key_group",
    "key_hex",
    "key_from_hex",
    "KEY_HEX_RE",
]

ChunkKey = NewType("ChunkKey", bytes)

_GROUP_BYTES = 4
#: What a key looks like in a file name: an even number of lowercase hex digits.
KEY_HEX_RE = re.compile(r"^(?:[0-9a-f]{2}){5,256}$")


def make_key(block_hash: bytes, group_idx: int) -> ChunkKey:
    if not 0 <= group_idx < 2 ** (8 * _GROUP_BYTES):
        raise ValueError(f"group index out of range: {group_idx}")
    return ChunkKey(bytes(block_hash) + group_idx.to_bytes(_GROUP_BYTES, "big"))


def key_hash(key: bytes) -> bytes:
    return key[:-_GROUP_BYTES]


def key_group(key: bytes) -> int:
    return int.from_bytes(key[-_GROUP_BYTES:], "big")


def key_hex(key: bytes) -> str:
    return key.hex()


def key_from_hex(text: str) -> ChunkKey:
    """Inverse of ``key_hex``; raises ValueError on anything that is not a key."""
    if not KEY_HEX_RE.match(text):
        raise ValueError(f"not a chunk key: {text[:80]!r}")
    try:
        return ChunkKey(binascii.unhexlify(text))
    except binascii.Error as exc:  # pragma: no cover - regex already guards
        raise ValueError(f"not a chunk key: {text[:80]!r}") from exc
