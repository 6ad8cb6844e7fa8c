"""``hybridkv verify``: check every chunk file's header and checksum, in parallel.

Each file is read through ``ChunkStore.read`` (the engine's verified read: header
against the expected key, group, layout and sizes, then the payload checksum), by
a thread pool. A file is *bad* when it fails that check, cannot be read, has a name
that is not a chunk key, or sits in a directory its key does not map to.

Invariants:
- Without ``quarantine=True`` nothing is moved or removed: the store's own
  quarantine step (which ``read`` calls on a bad file) is recorded, not done.
- With ``quarantine=True`` bad files are moved to ``<layout>/quarantine/``
  (``ChunkStore.quarantine``), exactly as an engine would on a failed load.
- A file that vanishes while being checked (evicted by a running engine) is
  counted as vanished, not bad; a file from a newer hybridkv is counted as too new.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hybridkv.keys import key_group
from hybridkv.store.chunk_store import ChunkStore
from hybridkv.store.file_map import key_of_name
from hybridkv.store.format import ChunkCorrupt, ChunkMissing, ChunkTooNew, ChunkUnreadable
from hybridkv.tools.common import (
    ChunkFile,
    LayoutDir,
    ToolError,
    chunk_files,
    human_bytes,
    layout_dirs,
    progress,
)

__all__ = ["verify_cache", "format_report", "read_integrity_key"]


class _CheckingStore(ChunkStore):
    """``ChunkStore`` whose quarantine step is recorded, and done only when asked."""

    def __init__(self, *args, move: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.move = move
        self.flagged: dict[bytes, str] = {}
        self._lock = threading.Lock()

    def quarantine(self, key: bytes, reason: str) -> None:
        with self._lock:
            self.flagged[key] = reason
        if self.move:
            super().quarantine(key, reason)


def read_integrity_key(path: str | None) -> bytes | None:
    """The key of ``--integrity-key-file`` (``integrity.load_key``: the engine's rules);
    ``ToolError`` naming the file when unusable."""
    if path is None:
        return None
    from hybridkv.store.integrity import IntegrityKeyError, load_key

    try:
        return load_key(path)
    except IntegrityKeyError as exc:
        raise ToolError(f"--integrity-key-file: {exc}") from None


def _make_store(ld: LayoutDir, rank: int, *, move: bool, key: bytes | None) -> _CheckingStore:
    extra = {} if key is None else {"integrity_key": key}
    return _CheckingStore(ld.cache_dir, ld.layout, rank=rank, move=move, **extra)


def _check(store: _CheckingStore, f: ChunkFile) -> tuple[str, str, int, bool]:
    """(status, reason, payload bytes, by_path): status is ok | bad | vanished | too_new;
    by_path: a bad file ``ChunkStore.quarantine`` cannot move (it works by key)."""
    name = os.path.basename(f.path)
    try:
        key = key_of_name(name)
    except ValueError:
        return "bad", "file name is not a chunk key", 0, True
    if key_group(key) != f.group or os.fspath(store.path(key)) != f.path:
        return "bad", f"misplaced: its key belongs in {store.path(key).parent}", 0, True
    try:
        store.layout.group(f.group)
    except KeyError:
        return "bad", f"group {f.group} is not in the layout", 0, True
    try:
        header, arrays = store.read(key)
    except ChunkMissing:
        return "vanished", "removed while being checked", 0, False
    except ChunkTooNew as exc:
        return "too_new", str(exc), 0, False
    except (ChunkCorrupt, ChunkUnreadable) as exc:
        return "bad", str(exc), 0, False
    return "ok", "", sum(a.nbytes for a in arrays), False


def _bounded_map(pool: ThreadPoolExecutor, fn, items: list, batch: int = 4096):
    """``pool.map`` in order, with at most ``batch`` tasks queued (a million files would
    otherwise mean a million futures at once)."""
    for lo in range(0, len(items), batch):
        yield from pool.map(fn, items[lo:lo + batch])


def _move_aside(ld: LayoutDir, path: str) -> None:
    """Quarantine a file that has no key (``ChunkStore.quarantine`` needs one)."""
    dst = ld.files.quarantine_path(os.path.basename(path))
    os.makedirs(dst.parent, mode=0o700, exist_ok=True)
    os.replace(path, dst)


def verify_layout(ld: LayoutDir, *, quarantine: bool = False, workers: int = 8,
                  key: bytes | None = None, show_progress: bool = False) -> dict:
    groups = {g.index: {"index": g.index, "kind": g.kind.value, "files": 0, "ok": 0,
                        "bad": 0, "vanished": 0, "too_new": 0, "payload_bytes_ok": 0}
              for g in ld.layout.groups}
    bad: list[dict] = []
    for rank in ld.ranks():
        store = _make_store(ld, rank, move=quarantine, key=key)
        files = chunk_files(store)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = _bounded_map(pool, lambda f: _check(store, f), files)
            for f, (status, reason, nbytes, by_path) in zip(
                    files, progress(results, total=len(files), desc=f"verifying r{rank}",
                                    enabled=show_progress)):
                g = groups.setdefault(f.group, {"index": f.group, "kind": None, "files": 0,
                                                "ok": 0, "bad": 0, "vanished": 0, "too_new": 0,
                                                "payload_bytes_ok": 0})
                g["files"] += 1
                g[status] += 1
                if status == "ok":
                    g["payload_bytes_ok"] += nbytes
                elif status != "vanished":
                    bad.append({"path": f.path, "rank": rank, "group": f.group,
                                "status": status, "reason": reason,
                                "by_path": by_path})
        for item in bad:
            if item["rank"] != rank:
                continue
            by_path = item.pop("by_path")
            if item["status"] != "bad":
                continue
            if quarantine and by_path and os.path.exists(item["path"]):
                try:  # a stray or misplaced name: the store quarantines only by key
                    _move_aside(ld, item["path"])
                except OSError as exc:
                    item["quarantine_error"] = str(exc)
            item["quarantined"] = quarantine and not os.path.exists(item["path"])
    return {"fingerprint": ld.fingerprint, "path": os.fspath(ld.path), "model": ld.layout.model,
            "groups": sorted(groups.values(), key=lambda g: g["index"]),
            "files": sum(g["files"] for g in groups.values()),
            "ok": sum(g["ok"] for g in groups.values()),
            "bad": sum(g["bad"] for g in groups.values()),
            "vanished": sum(g["vanished"] for g in groups.values()),
            "too_new": sum(g["too_new"] for g in groups.values()),
            "bad_files": bad}


def verify_cache(cache_dir: str | os.PathLike, *, quarantine: bool = False, workers: int = 8,
                 key: bytes | None = None, fingerprints: tuple[str, ...] = (),
                 show_progress: bool = False) -> dict:
    if workers < 1:
        raise ToolError(f"--workers {workers}: must be at least 1")
    dirs = layout_dirs(cache_dir, fingerprints)
    layouts = [verify_layout(d, quarantine=quarantine, workers=workers, key=key,
                             show_progress=show_progress) for d in dirs]
    return {"cache_dir": os.fspath(Path(cache_dir).resolve()), "quarantine": quarantine,
            "workers": workers, "layouts": layouts,
            "files": sum(x["files"] for x in layouts), "ok": sum(x["ok"] for x in layouts),
            "bad": sum(x["bad"] for x in layouts)}


def format_report(report: dict) -> str:
    lines = []
    for lt in report["layouts"]:
        lines.append(f"layout {lt['fingerprint']} ({lt['model']}): {lt['files']} files, "
                     f"{lt['ok']} ok, {lt['bad']} bad, {lt['vanished']} vanished, "
                     f"{lt['too_new']} too new")
        lines.append(f"  {'group':<6}{'kind':<16}{'files':>8}{'ok':>8}{'bad':>6}"
                     f"{'vanished':>10}{'too new':>9}{'payload ok':>13}")
        for g in lt["groups"]:
            lines.append(f"  g{g['index']:<5}{g['kind'] or '?':<16}{g['files']:>8}{g['ok']:>8}"
                         f"{g['bad']:>6}{g['vanished']:>10}{g['too_new']:>9}"
                         f"{human_bytes(g['payload_bytes_ok']):>13}")
        for b in lt["bad_files"]:
            moved = " (quarantined)" if b.get("quarantined") else ""
            lines.append(f"  {b['status'].upper()} {b['path']}: {b['reason']}{moved}")
    verdict = "all files verified" if report["bad"] == 0 else (
        f"{report['bad']} bad file(s)" + ("; moved to quarantine/" if report["quarantine"]
                                          else "; rerun with --quarantine to move them aside"))
    lines.append(f"{report['files']} files checked: {verdict}")
    return "\n".join(lines)
