"""The index snapshot file: its bytes, and reading and writing it through ``FileIO``.

One file per rank, ``<layout_dir>/r<rank>/index.snapshot`` (``FileMap.snapshot``)::

    b"HKVSNAP\\0" | u32 version | u64 body length | u64 xxh3_64(body) | body

The body (msgpack, ``Snapshot``) repeats the version and holds the layout
fingerprint, the rank, when it was taken and the ``ChunkRecord``s of the index,
least recently used first (so recency survives a restart).

Invariants:
- ``decode_snapshot`` returns a snapshot only when magic, version, length,
  checksum, body, fingerprint and rank are all right; otherwise it raises
  ``SnapshotInvalid`` naming the first thing that is wrong.
- ``write_snapshot`` replaces the file atomically (``FileIO.write_atomic``).
"""

from __future__ import annotations

import struct
import time

import msgspec
import xxhash

from hybridkv.chunks import ChunkRecord
from hybridkv.store.chunk_store import ChunkStore

__all__ = ["SNAPSHOT_VERSION", "Snapshot", "SnapshotInvalid", "decode_snapshot",
           "encode_snapshot", "read_snapshot", "write_snapshot"]

SNAPSHOT_VERSION = 1
_MAGIC = b"HKVSNAP\0"
_HEAD = struct.Struct("<8sIQQ")  # magic, version, body length, xxh3_64(body)


class SnapshotInvalid(ValueError):
    """A snapshot that must not be used; the message says why."""


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    version: int
    fingerprint: str
    rank: int
    taken_ns: int  # wall clock (time.time_ns) when the records were taken
    records: list[ChunkRecord]  # least recently used first


def encode_snapshot(fingerprint: str, rank: int, records: list[ChunkRecord], *,
                    taken_ns: int | None = None) -> list[bytes]:
    """(head, body) of a snapshot file."""
    body = msgspec.msgpack.encode(Snapshot(
        version=SNAPSHOT_VERSION, fingerprint=fingerprint, rank=rank,
        taken_ns=time.time_ns() if taken_ns is None else taken_ns, records=records))
    head = _HEAD.pack(_MAGIC, SNAPSHOT_VERSION, len(body), xxhash.xxh3_64_intdigest(body))
    return [head, body]


def decode_snapshot(data: bytes, *, fingerprint: str, rank: int) -> Snapshot:
    """The snapshot in ``data``, or ``SnapshotInvalid`` naming what is wrong."""
    if len(data) < _HEAD.size:
        raise SnapshotInvalid(f"truncated: {len(data)} bytes, shorter than its header")
    magic, version, length, digest = _HEAD.unpack_from(data)
    if magic != _MAGIC:
        raise SnapshotInvalid("not an index snapshot (bad magic)")
    if version != SNAPSHOT_VERSION:
        raise SnapshotInvalid(f"format version {version}, this hybridkv reads {SNAPSHOT_VERSION}")
    if len(data) != _HEAD.size + length:
        raise SnapshotInvalid(
            f"truncated or padded: {len(data)} bytes, its header says {_HEAD.size + length}")
    body = memoryview(data)[_HEAD.size:]
    if xxhash.xxh3_64_intdigest(body) != digest:
        raise SnapshotInvalid("checksum mismatch")
    try:
        snap = msgspec.msgpack.decode(body, type=Snapshot)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise SnapshotInvalid(f"does not decode: {exc}") from None
    if snap.version != version:
        raise SnapshotInvalid(f"body version {snap.version} differs from header {version}")
    if snap.fingerprint != fingerprint:
        raise SnapshotInvalid(f"layout fingerprint {snap.fingerprint!r}, expected {fingerprint!r}")
    if snap.rank != rank:
        raise SnapshotInvalid(f"rank {snap.rank}, expected {rank}")
    return snap


def write_snapshot(store: ChunkStore, records: list[ChunkRecord]) -> int:
    """Write the snapshot of ``records`` (LRU first) atomically; returns its bytes."""
    parts = encode_snapshot(store.fingerprint, store.paths.rank, records)
    store.io.write_atomic(store.paths.snapshot(), parts)
    return sum(len(p) for p in parts)


def read_snapshot(store: ChunkStore) -> Snapshot | None:
    """The store's snapshot; None when there is none; ``SnapshotInvalid`` when unusable."""
    path = store.paths.snapshot()
    try:
        data = store.io.read_all(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SnapshotInvalid(f"unreadable: {exc}") from None
    return decode_snapshot(data, fingerprint=store.fingerprint, rank=store.paths.rank)
