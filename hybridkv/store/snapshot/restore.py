"""Restarting from the index snapshot: the records still true of the directory.

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
- A snapshot that ``decode_snapshot`` or ``validate_records`` refuses is ignored
  as a whole: ``restore`` falls back to the full header scan, which logs its
  progress. Nothing here changes a chunk file (only stale temp files are
  removed, with ``clean_temp``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import compress

from hybridkv.chunks import ChunkRecord
from hybridkv.store.chunk_store import ChunkStore
from hybridkv.store.file_map import (
    chunk_names,
    key_of_name,
    list_names,
    placed_names,
    remove_stale_temp,
)
from hybridkv.store.format import ChunkError, ChunkTooNew
from hybridkv.store.snapshot.codec import Snapshot, SnapshotInvalid, read_snapshot
from hybridkv.store.snapshot.validate import validate_records

__all__ = ["Restored", "full_scan", "recheck", "restore"]

log = logging.getLogger(__name__)

#: added files beyond this are described by a thread pool (header reads wait on I/O)
_PARALLEL_DESCRIBE = 256


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
                    out.tmp_removed = (remove_stale_temp(temp)
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
    validate_records(records, keys)
    names = chunk_names(keys)
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
        records, keys, changed, vanished = _stat_all(store, records)
        dropped += vanished
    new: list[bytes] = []
    for name in new_names:
        try:
            new.append(key_of_name(name))
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


def _list_rank(store: ChunkStore) -> tuple[list[list[str]], list[str], list[str]]:
    """(chunk names of each leaf directory, the leaf directories, temp files in them).

    Lists every ``g<group>/<hh>/`` of the layout's groups once (other directories
    are not where the store reads: ``clean_temp`` walks them). A name counts only
    in the directory its key maps to (``file_map.placed_names``).
    """
    listing: list[list[str]] = []
    leaves: list[str] = []
    temp: list[str] = []
    for leaf in store.paths.leaves(g.index for g in store.layout.groups):
        leaves.append(leaf.path)
        names, stray = placed_names(leaf, list_names(leaf.path))
        listing.append(names)  # every name: <hh>...<group>.safetensors
        temp += stray
    return listing, leaves, temp


def _stat_all(store: ChunkStore, records: list[ChunkRecord]):
    """(records whose file's size and mtime agree, their keys, keys whose differ, vanished)."""
    kept: list[ChunkRecord] = []
    changed: list[bytes] = []
    vanished = 0
    for rec in records:
        try:
            st = os.stat(store.paths.chunk_str(rec.key))
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
