"""What the operator commands share: finding layout directories, one-line errors, progress.

Invariants:
- Every problem with the user's arguments or directory is a ``ToolError`` whose
  message names the bad value; the CLI prints it as one line and exits 2. Nothing
  here changes a file.
- A *layout directory* is ``<cache_dir>/<fingerprint>/`` holding a ``layout.json``
  whose layout hashes to that fingerprint; nothing else under the cache directory
  is ever read or touched by the tools.
- Progress bars go to stderr, only when stderr is a terminal and the output is not
  JSON, so piped and ``--json`` output stay clean.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from hybridkv.groups import HybridLayout
from hybridkv.store.chunk_store import ChunkStore
from hybridkv.store.file_map import (
    LAYOUT_NAME,
    STALE_TMP_SECONDS,
    FileMap,
    LayoutFileInvalid,
    is_chunk_name,
    is_stale_temp,
    list_names,
    read_layout_file,
    temp_files,
)
from hybridkv.store.fileio import FileIO
from hybridkv.store.format import ChunkTooNew

__all__ = ["ToolError", "LayoutDir", "layout_dirs", "chunk_files", "temp_files", "is_stale_temp",
           "quarantined_files", "progress", "human_bytes", "parse_budget", "STALE_TMP_SECONDS"]

T = TypeVar("T")


class ToolError(Exception):
    """Bad argument or directory: the message is the one line the user sees."""


@dataclass(frozen=True)
class LayoutDir:
    """One layout fingerprint's directory and the layout its ``layout.json`` describes."""

    cache_dir: Path
    path: Path
    layout: HybridLayout

    @property
    def fingerprint(self) -> str:
        return self.path.name

    @property
    def files(self) -> FileMap:
        return FileMap(self.cache_dir, self.fingerprint)

    def ranks(self) -> list[int]:
        """Worker ranks with a directory ``r<rank>/``, ascending."""
        return self.files.ranks()

    def store(self, rank: int) -> ChunkStore:
        return ChunkStore(self.cache_dir, self.layout, rank=rank)


def check_cache_dir(cache_dir: str | os.PathLike) -> Path:
    root = Path(cache_dir)
    if not root.exists():
        raise ToolError(f"--cache-dir {os.fspath(cache_dir)}: no such directory")
    if not root.is_dir():
        raise ToolError(f"--cache-dir {os.fspath(cache_dir)}: not a directory")
    if not os.access(root, os.R_OK | os.X_OK):
        raise ToolError(f"--cache-dir {os.fspath(cache_dir)}: permission denied")
    if (root / LAYOUT_NAME).is_file():
        raise ToolError(f"--cache-dir {os.fspath(cache_dir)} is a layout directory; pass its "
                        f"parent {os.fspath(root.parent)}")
    return root


def read_layout(path: Path, io: FileIO | None = None) -> HybridLayout:
    """The layout of ``path/layout.json``; ``ToolError`` naming the file when unusable."""
    file = path / LAYOUT_NAME
    try:
        return read_layout_file(io or FileIO(), file).layout
    except ChunkTooNew as exc:
        raise ToolError(f"{exc}; upgrade hybridkv") from None
    except LayoutFileInvalid as exc:
        raise ToolError(str(exc)) from None
    except OSError as exc:
        raise ToolError(f"{file}: cannot read: {exc.strerror or exc}") from None


def layout_dirs(cache_dir: str | os.PathLike, fingerprints: Iterable[str] = ()) -> list[LayoutDir]:
    """Every layout directory under ``cache_dir`` (those named in ``fingerprints`` if any)."""
    root = check_cache_dir(cache_dir)
    wanted = list(fingerprints)
    paths = [Path(e.path) for e in sorted(_scandir(root), key=lambda e: e.name)
             if e.is_dir() and (Path(e.path) / LAYOUT_NAME).is_file()]
    names = {p.name for p in paths}
    for fp in wanted:
        if fp not in names:
            raise ToolError(f"--fingerprint {fp}: no layout directory {root / fp} "
                            f"(found: {', '.join(sorted(names)) or 'none'})")
    if not paths:
        raise ToolError(f"--cache-dir {os.fspath(cache_dir)}: no layout directories "
                        "(<fingerprint>/layout.json) found; is this a hybridkv cache_dir?")
    # only the selected layout files are read: a bad one elsewhere can be left out
    return [LayoutDir(root, p, read_layout(p)) for p in paths if not wanted or p.name in wanted]


def _scandir(path: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []


@dataclass(frozen=True)
class ChunkFile:
    """A ``*.safetensors`` file found in a group directory of one rank."""

    path: str
    group: int  # from its g<group> directory


def chunk_files(store: ChunkStore) -> list[ChunkFile]:
    """Every chunk-named file under ``r<rank>/g*/<hh>/`` (also groups the layout lacks)."""
    return [ChunkFile(os.path.join(leaf.path, name), leaf.group)
            for leaf in store.paths.leaves() for name in list_names(leaf.path)
            if is_chunk_name(name)]


def quarantined_files(layout_dir: Path) -> list[os.DirEntry]:
    quarantine = FileMap(layout_dir.parent, layout_dir.name).quarantine_dir
    return [e for e in _scandir(quarantine) if e.is_file(follow_symlinks=False)]


def progress(items: Iterable[T], *, total: int | None, desc: str, enabled: bool) -> Iterator[T]:
    """``items``, with a tqdm bar on stderr when ``enabled`` and stderr is a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield from items
        return
    from tqdm import tqdm

    with tqdm(items, total=total, desc=desc, file=sys.stderr, leave=False,
              unit="file" if total is not None else "it", dynamic_ncols=True) as bar:
        yield from bar


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


def parse_min_free_space(value: str | None,
                         option: str = "--min-free-space") -> int | str | None:
    """``--min-free-space SIZE|N%`` as ``min_free_space`` takes it; ``ToolError`` naming it."""
    if value is None:
        return None
    from hybridkv.config import ConfigError, HybridKVConfig

    try:
        return HybridKVConfig.from_extra_config(
            {"cache_dir": ".", "min_free_space": value}).min_free_space
    except ConfigError as exc:
        raise ToolError(str(exc).replace("min_free_space", option, 1)) from None


def parse_budget(value: str | None, option: str = "--budget") -> int | None:
    """``--budget SIZE`` as bytes (None when not given); ``ToolError`` naming the value."""
    if value is None:
        return None
    from hybridkv.config import ConfigError, parse_size

    try:
        size = parse_size(value, option)
    except ConfigError as exc:
        raise ToolError(str(exc)) from None
    if size <= 0:
        raise ToolError(f"{option}: must be positive, got {value!r}")
    return size


def age_seconds(mtime: float | None, now: float | None = None) -> float | None:
    return None if mtime is None else max(0.0, (time.time() if now is None else now) - mtime)


@dataclass
class Records:
    """The chunks of one rank and where they were learnt from."""

    records: list  # ChunkRecord, least recently used first (snapshot order, else by mtime)
    source: str  # "snapshot" (checked against a directory listing) | "scan" (every header)
    reason: str = ""  # why the scan ran
    snapshot_age_s: float | None = None


def read_records(store: ChunkStore, *, show_progress: bool) -> Records:
    """The chunks of ``store``'s rank, fast: the index snapshot checked against a listing
    of the directories (``snapshot.restore``) when there is a valid one, else every
    chunk header, read in parallel (``ChunkStore.scan``). Changes nothing on disk."""
    from hybridkv.store.snapshot import SnapshotInvalid, read_snapshot, restore

    snap_path = store.paths.snapshot()
    try:
        age = age_seconds(os.stat(snap_path).st_mtime)
    except OSError:
        age = None
    try:
        try:
            snapshot = read_snapshot(store)
            reason = "no snapshot" if snapshot is None else ""
        except SnapshotInvalid as exc:
            snapshot, reason = None, f"snapshot ignored: {exc}"
        if snapshot is not None:
            del snapshot
            restored = restore(store, use_snapshot=True, clean_temp=False)
            if restored.source == "snapshot":
                return Records(restored.records, "snapshot", snapshot_age_s=age)
            reason = restored.reason
        total = len(chunk_files(store))
        records = list(progress(store.scan(), total=total,
                                desc=f"reading headers of {store.paths.rank_dir().name}",
                                enabled=show_progress))
    except ChunkTooNew as exc:
        raise ToolError(f"{exc}; upgrade hybridkv to read this directory") from None
    records.sort(key=lambda r: r.mtime_ns)
    return Records(records, "scan", reason=reason, snapshot_age_s=age)


def iso_time(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    from datetime import datetime, timezone

    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")
