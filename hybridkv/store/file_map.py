"""Where every file lives under a cache directory, and how its name is spelled.

    <cache_dir>/<fingerprint>/layout.json                       the layout, for people and tools
    <cache_dir>/<fingerprint>/r<rank>/g<group>/<hh>/<key>.safetensors   one chunk
    <cache_dir>/<fingerprint>/r<rank>/index.snapshot            the index snapshot of that rank
    <cache_dir>/<fingerprint>/quarantine/                       files that failed verification
    <cache_dir>/<fingerprint>/stats/                            per-process counters (JSON)
    <cache_dir>/<fingerprint>/fleet/                            the fleet budget's files

``<key>`` is the hex of the chunk key and ``<hh>`` its first byte, so no
directory grows past a few thousand entries per 2**8 fan-out level and a key
can never name a path outside its directory.

Invariants (nothing else in hybridkv spells these):
- A chunk's path is a pure function of (cache dir, fingerprint, rank, key);
  ``FileMap.chunk`` and its string form ``FileMap.chunk_str`` name the same file.
- A chunk's file name is ``<key hex>.safetensors`` (``chunk_name``); a name is a
  chunk name when it ends so and does not start with ``.`` (``key_of_name``).
- Leaf directories ``r<rank>/g<group>/<hh>/`` are found by ``FileMap.leaves``
  and listed by ``list_names`` (names only); ``placed_names`` keeps the names a
  leaf may hold (``<hh>`` their first byte, ``g<group>`` their last four).
- A temp file is ``.<host>.<pid>.<n>.<final name>.tmp`` in its final file's
  directory (``temp_path``); it is stale when its writer (on this host) is gone
  or it is older than ``max_age`` (``is_stale_temp``, the only judge).
- ``layout.json`` is written once (``write_layout_file``) and read by
  ``read_layout_file`` only, through the caller's ``FileIO``.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import time
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import msgspec

from hybridkv.groups import HybridLayout
from hybridkv.keys import key_from_hex, key_group, key_hex
from hybridkv.store.format import FORMAT_VERSION, ChunkTooNew

if TYPE_CHECKING:  # pragma: no cover
    from hybridkv.store.fileio import FileIO

__all__ = [
    "CHUNK_SUFFIX", "FLEET_DIR", "HOST", "LAYOUT_NAME", "SNAPSHOT_NAME", "STALE_TMP_SECONDS",
    "TMP_SUFFIX", "FileMap", "Leaf", "LayoutFile", "LayoutFileInvalid", "chunk_name", "chunk_names",
    "is_chunk_name", "is_stale_temp", "is_temp_name", "key_of_name", "list_names",
    "placed_names", "read_layout_file", "remove_stale_temp", "temp_files", "temp_path",
    "tmp_name_prefix", "write_layout_file",
]

CHUNK_SUFFIX = ".safetensors"
TMP_SUFFIX = ".tmp"
SNAPSHOT_NAME = "index.snapshot"
LAYOUT_NAME = "layout.json"
FLEET_DIR = "fleet"
#: temp files of a dead process, or older than this, are stale
STALE_TMP_SECONDS = 3600.0
#: this host as temp names and fleet members spell it (no dots: names split on them)
HOST = socket.gethostname().replace(".", "_")[:32]

_GROUP_DIR = re.compile(r"^g(\d+)$")
_RANK_DIR = re.compile(r"^r(\d+)$")
_temp_counter = itertools.count(1)  # next() is atomic under the GIL


class Leaf(NamedTuple):
    """One leaf directory ``g<group>/<hh>/`` of a rank."""

    group: int
    hh: str  # its name: the first byte, in hex, of the keys it holds
    path: str


class FileMap:
    """Path arithmetic for one layout fingerprint and one worker rank."""

    def __init__(self, cache_dir: str | Path, fingerprint: str, rank: int = 0):
        self.cache_dir = Path(cache_dir)
        self.fingerprint = fingerprint
        self.layout_dir = self.cache_dir / fingerprint
        self.rank = rank
        self._group_strs: dict[int, str] = {}  # group -> str(group_dir(group)), this rank

    def rank_dir(self, rank: int | None = None) -> Path:
        return self.layout_dir / f"r{self.rank if rank is None else rank}"

    def ranks(self) -> list[int]:
        """Worker ranks with a directory ``r<rank>/``, ascending."""
        return sorted(int(m.group(1)) for m in map(_RANK_DIR.match, list_names(self.layout_dir))
                      if m and (self.layout_dir / m.group(0)).is_dir())

    def group_dir(self, group: int, rank: int | None = None) -> Path:
        return self.rank_dir(rank) / f"g{group}"

    def chunk(self, key: bytes, rank: int | None = None) -> Path:
        hx = key_hex(key)
        return self.group_dir(key_group(key), rank) / hx[:2] / f"{hx}{CHUNK_SUFFIX}"

    def chunk_str(self, key: bytes) -> str:
        """``str(self.chunk(key))`` without pathlib's cost (hot path of small chunks)."""
        group = key_group(key)
        gdir = self._group_strs.get(group)
        if gdir is None:
            gdir = self._group_strs[group] = str(self.group_dir(group))
        hx = key_hex(key)
        return f"{gdir}/{hx[:2]}/{hx}{CHUNK_SUFFIX}"

    def snapshot(self, rank: int | None = None) -> Path:
        """The index snapshot of a rank (``hybridkv.store.snapshot``)."""
        return self.rank_dir(rank) / SNAPSHOT_NAME

    @property
    def layout_file(self) -> Path:
        return self.layout_dir / LAYOUT_NAME

    @property
    def quarantine_dir(self) -> Path:
        return self.layout_dir / "quarantine"

    def quarantine_path(self, name: str) -> Path:
        """Where a bad file named ``name`` is moved: a new name per move."""
        return self.quarantine_dir / f"{name}.{int(time.time() * 1e6)}"

    @property
    def stats_dir(self) -> Path:
        return self.layout_dir / "stats"

    @property
    def fleet_dir(self) -> Path:
        return self.layout_dir / FLEET_DIR

    def leaves(self, groups: Iterable[int] | None = None, rank: int | None = None) -> list[Leaf]:
        """The leaf directories of ``groups`` (of every ``g<N>`` directory when None):
        their two-character subdirectories, the only ones the store writes to."""
        if groups is None:
            groups = sorted(int(m.group(1)) for m in map(_GROUP_DIR.match,
                                                         list_names(self.rank_dir(rank))) if m)
        found: list[Leaf] = []
        for group in groups:
            try:
                with os.scandir(self.group_dir(group, rank)) as it:
                    found += [Leaf(group, e.name, e.path) for e in it
                              if len(e.name) == 2 and e.is_dir()]
            except (FileNotFoundError, NotADirectoryError):
                continue
        return found


# ---------------------------------------------------------------- names
def chunk_name(key: bytes) -> str:
    return f"{key_hex(key)}{CHUNK_SUFFIX}"


def chunk_names(keys: list[bytes]) -> list[str]:
    """``[chunk_name(k) for k in keys]`` in C loops (a snapshot's million records)."""
    if not keys:
        return []
    return ((CHUNK_SUFFIX + "\0").join(map(bytes.hex, keys)) + CHUNK_SUFFIX).split("\0")


def is_chunk_name(name: str) -> bool:
    return name.endswith(CHUNK_SUFFIX) and not name.startswith(".")


def key_of_name(name: str) -> bytes:
    """The key a chunk file name spells; ValueError for any other name."""
    if not is_chunk_name(name):
        raise ValueError(f"not a chunk file name: {name[:80]!r}")
    return key_from_hex(name[: -len(CHUNK_SUFFIX)])


def list_names(directory: str | os.PathLike) -> list[str]:
    """The names in ``directory`` (none when it is gone or not a directory)."""
    try:
        return os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []


def placed_names(leaf: Leaf, names: list[str]) -> tuple[list[str], list[str]]:
    """(the names of ``leaf`` whose key maps there, the paths of its temp files).

    The usual leaf holds nothing else: checked with two ``str.count`` calls,
    name by name only when that fails (a temp file, a stray or misplaced name).
    """
    tail = f"{leaf.group:08x}{CHUNK_SUFFIX}"  # the key's last four bytes: its group
    joined = "\0".join(names)
    if (("\0" + joined).count("\0" + leaf.hh) == len(names)
            and (joined + "\0").count(tail + "\0") == len(names)):
        return names, []
    temp = [os.path.join(leaf.path, name) for name in names if is_temp_name(name)]
    return [name for name in names if name.startswith(leaf.hh) and name.endswith(tail)], temp


# ---------------------------------------------------------------- temp files
def tmp_name_prefix() -> str:
    """``.<host>.<pid>.``: identifies the process that owns a temp file."""
    return f".{HOST}.{os.getpid()}."


def temp_path(path: str | os.PathLike) -> Path:
    """A new temp name for ``path``, in its directory (unique within this process)."""
    path = Path(path)
    return path.with_name(f"{tmp_name_prefix()}{next(_temp_counter)}.{path.name}{TMP_SUFFIX}")


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def temp_files(root: str | os.PathLike, *, skip: Collection[str] = ()) -> list[str]:
    """Temp files anywhere under ``root``, except in the directories of ``skip``
    (paths as ``os.walk`` joins them)."""
    skip = set(skip)
    found: list[str] = []
    for dirpath, dirs, files in os.walk(root):
        if skip:
            dirs[:] = [d for d in dirs if os.path.join(dirpath, d) not in skip]
        found += [os.path.join(dirpath, name) for name in files if is_temp_name(name)]
    return found


def is_stale_temp(path: str, *, max_age: float = STALE_TMP_SECONDS,
                  now: float | None = None) -> bool:
    """Whether temp file ``path`` is left over: its writer (on this host) is gone, or it
    is older than ``max_age`` seconds. Reads only; False when it cannot tell."""
    parts = os.path.basename(path).split(".")
    try:
        if len(parts) > 2 and parts[1] == HOST and parts[2].isdigit() \
                and not _pid_alive(int(parts[2])):
            return True
        return (time.time() if now is None else now) - os.stat(path).st_mtime > max_age
    except OSError:
        return False


def remove_stale_temp(paths: Iterable[str], *, max_age: float = STALE_TMP_SECONDS) -> int:
    """Remove those of ``paths`` (temp files) that ``is_stale_temp``. Returns how many."""
    removed = 0
    now = time.time()
    for path in paths:
        if is_stale_temp(path, max_age=max_age, now=now):
            try:
                os.unlink(path)
                removed += 1
            except OSError:
                continue
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------- layout.json
class LayoutFile(msgspec.Struct):
    """What ``layout.json`` holds."""

    format_version: int
    fingerprint: str
    layout: HybridLayout


class LayoutFileInvalid(ValueError):
    """A ``layout.json`` that is not the one hybridkv writes for its directory."""


def write_layout_file(io: FileIO, path: Path, layout: HybridLayout) -> None:
    """Write ``layout.json`` unless it exists (engines racing write equal bytes)."""
    if path.exists():
        return
    body = msgspec.json.format(msgspec.json.encode(LayoutFile(
        format_version=FORMAT_VERSION, fingerprint=layout.fingerprint, layout=layout)))
    try:
        io.write_atomic(path, body)
    except OSError:
        if not path.exists():
            raise


def read_layout_file(io: FileIO, path: Path) -> LayoutFile:
    """The ``layout.json`` at ``path``, whose directory is named after its fingerprint.

    Raises FileNotFoundError, OSError (unreadable), ``ChunkTooNew`` (written by a
    newer hybridkv: nothing else is interpreted) or ``LayoutFileInvalid``.
    """
    raw = io.read_all(path)
    try:
        version = msgspec.json.decode(raw).get("format_version")
    except (msgspec.DecodeError, AttributeError):
        version = None
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise ChunkTooNew(f"{path} declares chunk format version {version}, newer than this "
                          f"hybridkv reads ({FORMAT_VERSION})")
    try:
        doc = msgspec.json.decode(raw, type=LayoutFile)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        raise LayoutFileInvalid(f"{path}: not a hybridkv layout file: {exc}") from None
    name = path.parent.name
    if doc.layout.fingerprint != name or doc.fingerprint != name:
        raise LayoutFileInvalid(f"{path}: its layout hashes to {doc.layout.fingerprint}, not "
                                f"to the directory name {name}")
    return doc
