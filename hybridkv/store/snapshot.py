"""A persisted index snapshot: restart without reading every chunk header.

One file per rank, ``<layout_dir>/r<rank>/index.snapshot`` (``ChunkPaths.snapshot``),
written atomically through the store's ``FileIO``::

    b"HKVSNAP\\0" | u32 version | u64 body length | u64 xxh3_64(body) | body

The body (msgpack, ``Snapshot``) repeats the version and holds the layout
fingerprint, the rank, when it was taken and the ``ChunkRecord``s of the index,
least recently used first (so recency survives a restart).

Invariants:
- A snapshot is a hint, never the truth. ``restore`` keeps a record only if a
  file of that name is listed now in the record's own directory
  (``g<group>/<hh>/``); a record whose file is gone is dropped; a file listed
  but not in the snapshot has its header read (``ChunkStore.describe``).
- Size and mtime of a kept record are not checked at start by default (one
  ``stat`` per file costs more than the restart goal allows;
  ``benchmarks/restart.py`` measures it): its key is returned in
  ``Restored.unchecked``, and the caller must pass ``recheck`` (one ``stat``,
  the header re-read when size or mtime differ) before reporting it a HIT.
  ``check_stats=True`` checks every file at start instead.
- A snapshot with a wrong magic, version, length, checksum, fingerprint or rank,
  that does not decode, or whose records contradict their keys (group, parent
  group, key length) is ignored as a whole: ``restore`` falls back to the full
  header scan, which logs its progress. Nothing here changes a chunk file.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import msgspec
import xxhash

from hybridkv.chunks import ChunkRecord
from hybridkv.keys import key_from_hex, key_group
from hybridkv.store.chunk_store import ChunkStore
from hybridkv.store.format import ChunkError, ChunkTooNew
from hybridkv.store.paths import CHUNK_SUFFIX

__all__ = [
    "SNAPSHOT_VERSION", "Restored", "Snapshot", "SnapshotInvalid", "SnapshotWriter",
    "decode_snapshot", "encode_snapshot", "full_scan", "read_snapshot", "recheck", "restore",
    "write_snapshot",
]

log = logging.getLogger(__name__)

SNAPSHOT_VERSION = 1
_MAGIC = b"HKVSNAP\0"
_HEAD = struct.Struct("<8sIQQ")  # magic, version, body length, xxh3_64(body)
#: added files beyond this are described by a thread pool (header reads wait on I/O)
_PARALLEL_DESCRIBE = 256


class SnapshotInvalid(ValueError):
    """A snapshot that must not be used; the message says why."""


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    version: int
    fingerprint: str
    rank: int
    taken_ns: int  # wall clock (time.time_ns) when the records were taken
    records: list[ChunkRecord]  # least recently used first


# ---------------------------------------------------------------- encoding
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


# ---------------------------------------------------------------- restoring
@dataclass
class Restored:
    """What is on disk now, for ``ChunkIndex.load(records, by_mtime=False)``."""

    #: the snapshot's records still present (its order), then new files, oldest first
    records: list[ChunkRecord]
    #: keys whose size/mtime were not checked: ``recheck`` before the first HIT
    unchecked: set[bytes] = field(default_factory=set)
    source: str = "scan"  # "snapshot" | "scan"
    reason: str = ""  # why the full scan ran
    kept: int = 0  # snapshot records whose file is listed
    added: int = 0  # files not in the snapshot, read from their headers
    dropped: int = 0  # snapshot records whose file is gone
    changed: int = 0  # (check_stats) files whose size/mtime differ: header re-read
    seconds: float = 0.0


def restore(store: ChunkStore, *, use_snapshot: bool = True, check_stats: bool = False,
            log_every: float = 5.0) -> Restored:
    """The chunks of ``store``: from its snapshot checked against the directory, else a scan.

    Raises ``ChunkTooNew`` (like ``ChunkStore.scan``) when a new file was written by
    a newer hybridkv.
    """
    started = time.monotonic()
    path = store.paths.snapshot()
    reason = "snapshots disabled"
    if use_snapshot:
        try:
            snap = read_snapshot(store)
            reason = "no snapshot"
            if snap is not None:
                out = _check(store, snap, check_stats)
                out.seconds = time.monotonic() - started
                log.info("hybridkv: index snapshot %s: %d chunks kept, %d new read, %d gone, "
                         "%d changed, in %.2fs", path, out.kept, out.added, out.dropped,
                         out.changed, out.seconds)
                return out
        except SnapshotInvalid as exc:
            reason = f"snapshot ignored: {exc}"
            log.warning("hybridkv: ignoring index snapshot %s (%s); reading every chunk header",
                        path, exc)
    records = full_scan(store, log_every=log_every)
    return Restored(records=records, source="scan", reason=reason, added=len(records),
                    seconds=time.monotonic() - started)


def full_scan(store: ChunkStore, *, log_every: float = 5.0) -> list[ChunkRecord]:
    """Every chunk from its header (``ChunkStore.scan``), oldest file first; logs progress."""
    started = last = time.monotonic()
    records: list[ChunkRecord] = []
    for record in store.scan():
        records.append(record)
        now = time.monotonic()
        if now - last >= log_every:
            last = now
            log.info("hybridkv: full header scan of %s: %d chunks read in %.0fs",
                     store.paths.rank_dir(), len(records), now - started)
    records.sort(key=lambda r: r.mtime_ns)
    log.info("hybridkv: full header scan of %s: %d chunks in %.2fs", store.paths.rank_dir(),
             len(records), time.monotonic() - started)
    return records


def _check(store: ChunkStore, snap: Snapshot, check_stats: bool) -> Restored:
    listed = _list_leaf_dirs(store)
    kept: list[ChunkRecord] = []
    changed: list[bytes] = []
    new: list[bytes] = []
    dropped = 0
    from_bytes, get_leaf = int.from_bytes, listed.get  # hot loop: one pass per record
    for rec in snap.records:
        key, group, parent = rec.key, rec.group, rec.parent
        if (len(key) < 5 or from_bytes(key[-4:], "big") != group or rec.size < 0
                or (parent is not None and parent[-4:] != key[-4:])):
            raise SnapshotInvalid(f"record {key.hex()[:80]} contradicts its key")
        hx = key.hex()
        leaf = get_leaf((group, hx[:2]))
        name = hx + CHUNK_SUFFIX
        if leaf is None or name not in leaf[1]:
            dropped += 1
            continue
        leaf[1].remove(name)
        if check_stats:
            try:
                st = os.stat(os.path.join(leaf[0], name))
            except OSError:
                dropped += 1
                continue
            if st.st_size != rec.size or st.st_mtime_ns != rec.mtime_ns:
                changed.append(key)
                continue
        kept.append(rec)
    for (group, hh), (_, names) in listed.items():
        for name in names:
            if name.startswith(".") or not name.endswith(CHUNK_SUFFIX):
                continue
            try:
                key = key_from_hex(name[: -len(CHUNK_SUFFIX)])
            except ValueError as exc:
                log.warning("hybridkv: ignoring %s: %s", name, exc)
                continue
            if key_group(key) == group and name[:2] == hh:  # else not where the store reads
                new.append(key)
    rewritten = _describe_all(store, changed)
    added = _describe_all(store, new)
    return Restored(records=kept + sorted(rewritten + added, key=lambda r: r.mtime_ns),
                    unchecked=set() if check_stats else {r.key for r in kept},
                    source="snapshot", kept=len(kept), added=len(added),
                    dropped=dropped + len(changed) - len(rewritten), changed=len(rewritten))


def _list_leaf_dirs(store: ChunkStore) -> dict[tuple[int, str], tuple[str, set[str]]]:
    """(group, hh) -> (leaf directory, names in it) for every group of the layout."""
    listed: dict[tuple[int, str], tuple[str, set[str]]] = {}
    for g in store.layout.groups:
        try:
            with os.scandir(store.paths.group_dir(g.index)) as it:
                leaves = [(e.name, e.path) for e in it if e.is_dir()]
        except FileNotFoundError:
            continue
        for hh, leaf in leaves:
            try:
                listed[(g.index, hh)] = (leaf, set(os.listdir(leaf)))
            except FileNotFoundError:
                continue
    return listed


def _describe(store: ChunkStore, key: bytes) -> ChunkRecord | None:
    try:
        return store.describe(key)
    except ChunkTooNew as exc:
        raise ChunkTooNew(f"{store.path(key)}: {exc}") from exc
    except FileNotFoundError:
        return None  # evicted meanwhile
    except (OSError, ChunkError, ValueError) as exc:
        log.warning("hybridkv: ignoring %s: %s", store.path(key), exc)
        return None


def _describe_all(store: ChunkStore, keys: list[bytes]) -> list[ChunkRecord]:
    if len(keys) > _PARALLEL_DESCRIBE:
        with ThreadPoolExecutor(max_workers=8) as pool:
            found = list(pool.map(lambda k: _describe(store, k), keys, chunksize=64))
    else:
        found = [_describe(store, k) for k in keys]
    return [r for r in found if r is not None]


def recheck(store: ChunkStore, key: bytes, size: int,
            mtime_ns: int) -> tuple[bool, ChunkRecord | None]:
    """Is ``key``'s file still of ``size`` and ``mtime_ns``? One ``stat``.

    ``(True, None)``: yes. ``(False, record)``: it changed; ``record`` is read from
    its header now. ``(False, None)``: it is gone or its header is unusable.
    """
    try:
        st = os.stat(store.path(key))
    except OSError:
        return False, None
    if st.st_size == size and st.st_mtime_ns == mtime_ns:
        return True, None
    try:
        return False, _describe(store, key)
    except ChunkTooNew as exc:
        log.warning("hybridkv: ignoring %s", exc)
        return False, None


# ---------------------------------------------------------------- writing
class SnapshotWriter:
    """Writes one store's snapshot every ``interval`` seconds, off the caller's thread.

    The caller takes the records (on its own thread: the index is not thread-safe)
    only when ``due()``; encoding and writing run in a background thread, one at a
    time. A failed write is logged and never raised: the snapshot only saves time.
    """

    def __init__(self, store: ChunkStore, interval: float, *,
                 clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.interval = interval
        self._clock = clock
        self._last = clock()
        self._thread: threading.Thread | None = None
        self.written = 0
        self.failed = 0

    def due(self) -> bool:
        return (self._clock() - self._last >= self.interval
                and (self._thread is None or not self._thread.is_alive()))

    def start(self, records: list[ChunkRecord]) -> None:
        """Write ``records`` in the background (call when ``due()``)."""
        self._last = self._clock()
        self._thread = threading.Thread(target=self._write, args=(records,),
                                        name="hybridkv-snapshot", daemon=True)
        self._thread.start()

    def write(self, records: Iterable[ChunkRecord]) -> bool:
        """Write now (after any background write); True on success."""
        self.wait()
        self._last = self._clock()
        return self._write(list(records))

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _write(self, records: list[ChunkRecord]) -> bool:
        started = time.monotonic()
        try:
            nbytes = write_snapshot(self.store, records)
        except Exception as exc:  # noqa: BLE001 - an optimisation must not stop the engine
            self.failed += 1
            log.warning("hybridkv: cannot write index snapshot %s: %s",
                        self.store.paths.snapshot(), exc)
            return False
        self.written += 1
        log.debug("hybridkv: index snapshot of %d chunks (%d bytes) written in %.2fs",
                  len(records), nbytes, time.monotonic() - started)
        return True
