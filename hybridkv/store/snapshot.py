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
  ``Restored.unchecked``, and the caller must pass ``recheck`` before reporting
  it a HIT (the manager: with position and parent, so one header read compares
  every field of the record with the file). ``check_stats=True`` checks size and
  mtime of every file at start instead.
- The check at start is set-based: the records' file names against the names
  listed in each leaf directory (C-level set operations, no per-record Python
  work unless something changed). The same listing finds the temp files of the
  chunk directories (``restore(clean_temp=True)``): nothing walks them twice.
- A snapshot with a wrong magic, version, length, checksum, fingerprint or rank,
  that does not decode, or whose records contradict their keys (group, parent
  group, key length) or do not fit the index (a field out of range) is ignored
  as a whole: ``restore`` falls back to the full header scan, which logs its
  progress. Nothing here changes a chunk file (only stale temp files are
  removed, with ``clean_temp``).
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from array import array
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import compress

import msgspec
import numpy as np
import xxhash

from hybridkv.chunks import ChunkRecord
from hybridkv.keys import key_from_hex
from hybridkv.store.chunk_store import ChunkStore
from hybridkv.store.format import ChunkError, ChunkTooNew
from hybridkv.store.paths import CHUNK_SUFFIX, TMP_SUFFIX

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
    tmp_removed: int = 0  # (clean_temp) stale temp files removed
    seconds: float = 0.0
    #: seconds per phase (read, validate, list, compare, describe, clean_temp; or scan)
    phases: dict[str, float] = field(default_factory=dict)


def restore(store: ChunkStore, *, use_snapshot: bool = True, check_stats: bool = False,
            clean_temp: bool = False, log_every: float = 5.0) -> Restored:
    """The chunks of ``store``: from its snapshot checked against the directory, else a scan.

    ``clean_temp``: also remove stale temp files (``ChunkStore.clean_temp``); with a
    snapshot, those in the chunk directories are found by the same listing.
    Raises ``ChunkTooNew`` (like ``ChunkStore.scan``) when a new file was written by
    a newer hybridkv.
    """
    started = time.monotonic()
    path = store.paths.snapshot()
    reason = "snapshots disabled"
    phases: dict[str, float] = {}
    lap = _lap(phases)
    if use_snapshot:
        try:
            snap = read_snapshot(store)
            lap("read")
            reason = "no snapshot"
            if snap is not None:
                out, leaves, temp = _check(store, snap, check_stats, lap)
                if clean_temp:  # the leaves were just listed: only the rest is walked
                    out.tmp_removed = (store.remove_stale_temp(temp)
                                       + store.clean_temp(skip=leaves))
                    lap("clean_temp")
                out.seconds = time.monotonic() - started
                out.phases = phases
                log.info("hybridkv: index snapshot %s: %d chunks kept, %d new read, %d gone, "
                         "%d changed, in %.2fs", path, out.kept, out.added, out.dropped,
                         out.changed, out.seconds)
                return out
        except SnapshotInvalid as exc:
            reason = f"snapshot ignored: {exc}"
            log.warning("hybridkv: ignoring index snapshot %s (%s); reading every chunk header",
                        path, exc)
    lap(None)
    removed = store.clean_temp() if clean_temp else 0
    lap("clean_temp")
    records = full_scan(store, log_every=log_every)
    lap("scan")
    return Restored(records=records, source="scan", reason=reason, added=len(records),
                    tmp_removed=removed, seconds=time.monotonic() - started, phases=phases)


def _lap(phases: dict[str, float]) -> Callable[[str | None], None]:
    """``lap(name)``: the seconds since the previous lap, added to ``phases[name]``."""
    last = time.perf_counter()

    def lap(name: str | None) -> None:
        nonlocal last
        now = time.perf_counter()
        if name is not None:
            phases[name] = phases.get(name, 0.0) + now - last
        last = now
    return lap


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


def _check(store: ChunkStore, snap: Snapshot, check_stats: bool,
           lap: Callable[[str], None]) -> tuple[Restored, list[str], list[str]]:
    """The snapshot against the directory, by name sets (C-speed set operations).

    Every record becomes its file name; the listing gives the chunk names present
    in their own leaf directory. kept = named and present, gone = named and not
    present, new = present and not named (read from its header). Also returns the
    leaf directories listed and the temp files found in them.
    """
    records = snap.records
    keys = [r.key for r in records]
    _validate(records, keys)
    names = _names(keys)
    named = set(names)
    dropped = 0
    if len(named) != len(names):  # a hand-edited snapshot: the first record of a key wins
        first: dict[str, int] = {}
        for i, name in enumerate(names):
            first.setdefault(name, i)
        order = sorted(first.values())
        dropped = len(names) - len(order)
        records, keys, names = ([records[i] for i in order], [keys[i] for i in order],
                                [names[i] for i in order])
    lap("validate")
    listing, leaves, temp = _list_rank(store)
    lap("list")
    found, new_names = 0, []
    for listed in listing:  # no set is built unless something changed
        if named.issuperset(listed):
            found += len(listed)
        else:
            extra = [name for name in listed if name not in named]
            found += len(listed) - len(extra)
            new_names += extra
    if found != len(named):  # names of one leaf are unique and never in another leaf
        gone = named.difference(*listing)
        dropped += len(gone)
        keep = [name not in gone for name in names]
        records = list(compress(records, keep))
        keys = list(compress(keys, keep))
        names = list(compress(names, keep))
    changed: list[bytes] = []
    if check_stats:
        records, keys, changed, vanished = _stat_all(store, records, names)
        dropped += vanished
    new: list[bytes] = []
    for name in new_names:
        try:
            new.append(key_from_hex(name[: -len(CHUNK_SUFFIX)]))
        except ValueError as exc:
            log.warning("hybridkv: ignoring %s: %s", name, exc)
    unchecked = set() if check_stats else set(keys)
    lap("compare")
    rewritten = _describe_all(store, changed)
    added = _describe_all(store, new)
    lap("describe")
    return Restored(records=records + sorted(rewritten + added, key=lambda r: r.mtime_ns),
                    unchecked=unchecked,
                    source="snapshot", kept=len(records), added=len(added),
                    dropped=dropped + len(changed) - len(rewritten),
                    changed=len(rewritten)), leaves, temp


#: the index's column types (``hybridkv.index``): a value one cannot hold is hand-made
_COLUMNS = (("position", "i"), ("size", "I"), ("mtime_ns", "q"), ("group", "I"))


def _fits(code: str, value: int) -> bool:
    try:
        array(code, [value])
    except OverflowError:
        return False
    return True


def _validate(records: list[ChunkRecord], keys: list[bytes]) -> None:
    """``SnapshotInvalid`` unless every record agrees with its key (group, parent's
    group, key length) and fits the index's columns. Whole columns at once; the
    record named in the error is looked for only when a check failed."""
    if not records:
        return
    columns = {"position": [r.position for r in records], "size": [r.size for r in records],
               "mtime_ns": [r.mtime_ns for r in records], "group": [r.group for r in records]}
    for name, code in _COLUMNS:
        try:
            column = array(code, columns[name])  # OverflowError: a value it cannot hold
        except OverflowError:
            bad = next(r for r in records if not _fits(code, getattr(r, name)))
            raise SnapshotInvalid(f"record {bad.key.hex()[:80]}: {name} "
                                  f"{getattr(bad, name)} out of range") from None
    groups = np.asarray(column)  # the "group" column, as unsigned ints
    # a record without a parent compares its key with itself
    parents = [k if r.parent is None else r.parent for k, r in zip(keys, records)]
    lengths = set(map(len, keys))
    ok = min(lengths) >= 5
    if ok and len(lengths) == 1 and lengths == set(map(len, parents)):  # the usual case
        width = lengths.pop()
        tails = [np.ascontiguousarray(np.frombuffer(b"".join(col), dtype=np.uint8)
                                      .reshape(len(col), width)[:, width - 4:]).view(">u4")
                 for col in (keys, parents)]
        ok = bool(np.array_equal(tails[0].ravel(), groups) and np.array_equal(*tails))
    elif ok:
        ok = all(int.from_bytes(k[-4:], "big") == g and p[-4:] == k[-4:]
                 for k, p, g in zip(keys, parents, groups))
    if not ok:
        for rec in records:
            key, parent = rec.key, rec.parent
            if (len(key) < 5 or int.from_bytes(key[-4:], "big") != rec.group
                    or (parent is not None and parent[-4:] != key[-4:])):
                raise SnapshotInvalid(f"record {key.hex()[:80]} contradicts its key")
        raise AssertionError("unreachable: a contradiction was found above")  # pragma: no cover


def _names(keys: list[bytes]) -> list[str]:
    """The file name of each key (``ChunkPaths.chunk``), in C loops."""
    if not keys:
        return []
    return ((CHUNK_SUFFIX + "\0").join(map(bytes.hex, keys)) + CHUNK_SUFFIX).split("\0")


def _list_rank(store: ChunkStore) -> tuple[list[list[str]], list[str], list[str]]:
    """(chunk names of each leaf directory, the leaf directories, temp files in them).

    Lists every ``g<group>/<hh>/`` of the layout's groups once (other directories
    are not where the store reads: ``clean_temp`` walks them). A name counts only
    in the directory its key maps to (``<hh>`` its first byte, ``g<group>`` its
    last four): a whole directory is checked with two ``str.count`` calls, name by
    name only when that fails (a temp file, a stray or misplaced name).
    """
    listing: list[list[str]] = []
    leaves: list[str] = []
    temp: list[str] = []
    for g in store.layout.groups:
        try:
            with os.scandir(store.paths.group_dir(g.index)) as it:
                found = [(e.name, e.path) for e in it if len(e.name) == 2 and e.is_dir()]
        except FileNotFoundError:
            continue
        tail = f"{g.index:08x}{CHUNK_SUFFIX}"
        for hh, leaf in found:
            try:
                listed = os.listdir(leaf)
            except FileNotFoundError:
                continue
            leaves.append(leaf)
            joined = "\0".join(listed)
            if not (("\0" + joined).count("\0" + hh) == len(listed)
                    and (joined + "\0").count(tail + "\0") == len(listed)):
                temp += [os.path.join(leaf, name) for name in listed
                         if name.startswith(".") and name.endswith(TMP_SUFFIX)]
                listed = [name for name in listed if name.startswith(hh) and name.endswith(tail)]
            listing.append(listed)  # every name: <hh>...<group>.safetensors
    return listing, leaves, temp


def _stat_all(store: ChunkStore, records: list[ChunkRecord], names: list[str]):
    """(records whose file's size and mtime agree, their keys, keys whose differ, vanished)."""
    kept: list[ChunkRecord] = []
    changed: list[bytes] = []
    vanished = 0
    group_dirs = {g.index: os.fspath(store.paths.group_dir(g.index)) for g in store.layout.groups}
    for rec, name in zip(records, names):
        try:
            st = os.stat(os.path.join(group_dirs[rec.group], name[:2], name))
        except OSError:
            vanished += 1
            continue
        if st.st_size != rec.size or st.st_mtime_ns != rec.mtime_ns:
            changed.append(rec.key)
            continue
        kept.append(rec)
    return kept, [r.key for r in kept], changed, vanished


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


#: ``recheck``'s default for position and parent: not compared (no header read)
_UNCHECKED: object = object()


def recheck(store: ChunkStore, key: bytes, size: int, mtime_ns: int, *,
            position: int | object = _UNCHECKED,
            parent: bytes | None | object = _UNCHECKED) -> tuple[bool, ChunkRecord | None]:
    """Is ``key``'s file still of ``size`` and ``mtime_ns``? One ``stat``.

    With ``position`` and/or ``parent`` the header is read too (one ``describe``)
    and they are compared as well: what a hand-edited snapshot could have changed
    without changing the file. ``(True, None)``: yes. ``(False, record)``: it
    differs; ``record`` is read from its header now. ``(False, None)``: it is gone
    or its header is unusable.
    """
    if position is _UNCHECKED and parent is _UNCHECKED:
        try:
            st = os.stat(store.path(key))
        except OSError:
            return False, None
        if st.st_size == size and st.st_mtime_ns == mtime_ns:
            return True, None
    try:
        record = _describe(store, key)
    except ChunkTooNew as exc:
        log.warning("hybridkv: ignoring %s", exc)
        return False, None
    if (record is not None and (record.size, record.mtime_ns) == (size, mtime_ns)
            and position in (_UNCHECKED, record.position)
            and (parent is _UNCHECKED or parent == record.parent)):
        return True, None
    return False, record


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
