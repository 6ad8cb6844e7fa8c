"""``hybridkv inspect``: what a cache directory holds, per layout fingerprint.

For each layout directory: the model, its groups (kind, window, chunk bytes),
chunks and bytes per group, budget use (when ``--budget`` is given), the oldest
and newest chunk, quarantined files, temp files (and how many are stale), and the
age of each rank's index snapshot; for the cache directory, its filesystem's free
space and the floor hybridkv keeps there (``min_free_space``, the default unless
``--min-free-space`` is given).

Invariants:
- Reads only: no file is created, moved or removed.
- Counts come from the index snapshot checked against a listing of the chunk
  directories when a valid snapshot exists (a file listed but not in the
  snapshot has its header read; a record whose file is gone is dropped), else
  from every chunk header, read in parallel; so they describe the files there now.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from hybridkv.store.free_space import measure
from hybridkv.tools.common import (
    LayoutDir,
    age_seconds,
    human_bytes,
    is_stale_temp,
    iso_time,
    layout_dirs,
    quarantined_files,
    read_records,
    temp_files,
)

__all__ = ["inspect_cache", "inspect_layout", "format_report"]


def inspect_layout(ld: LayoutDir, *, budget: int | None = None,
                   show_progress: bool = False) -> dict:
    """The report of one layout directory (see the module docstring)."""
    now = time.time()
    layout = ld.layout
    groups = {g.index: {"index": g.index, "kind": g.kind.value, "window_tokens": g.window_tokens,
                        "chunk_tokens": g.chunk_tokens, "chunk_bytes": g.chunk_bytes,
                        "layers": len(g.layer_names), "chunks": 0, "bytes": 0,
                        "oldest": None, "newest": None} for g in layout.groups}
    ranks = []
    oldest = newest = None
    for rank in ld.ranks():
        found = read_records(ld.store(rank), show_progress=show_progress)
        nbytes = 0
        for r in found.records:
            g = groups.get(r.group)
            if g is None:  # pragma: no cover - the store reads only the layout's groups
                continue
            g["chunks"] += 1
            g["bytes"] += r.size
            nbytes += r.size
            t = r.mtime
            g["oldest"] = t if g["oldest"] is None else min(g["oldest"], t)
            g["newest"] = t if g["newest"] is None else max(g["newest"], t)
            oldest = t if oldest is None else min(oldest, t)
            newest = t if newest is None else max(newest, t)
        ranks.append({"rank": rank, "source": found.source, "scan_reason": found.reason or None,
                      "snapshot_age_s": found.snapshot_age_s, "chunks": len(found.records),
                      "bytes": nbytes})
    for g in groups.values():
        for k in ("oldest", "newest"):
            g[k] = iso_time(g[k])
    quarantine = quarantined_files(ld.path)
    temps = temp_files(ld.path)
    stale = [p for p in temps if is_stale_temp(p, now=now)]
    total = sum(r["bytes"] for r in ranks)
    return {
        "fingerprint": ld.fingerprint,
        "path": os.fspath(ld.path),
        "model": layout.model,
        "dtype": layout.dtype,
        "parallel": {"tp_size": layout.parallel.tp_size, "pp_size": layout.parallel.pp_size,
                     "pcp_size": layout.parallel.pcp_size, "dcp_size": layout.parallel.dcp_size},
        "groups": list(groups.values()),
        "ranks": ranks,
        "chunks": sum(r["chunks"] for r in ranks),
        "bytes": total,
        "budget": budget,
        "budget_used": None if budget is None else total / budget,
        "oldest_chunk": iso_time(oldest),
        "oldest_chunk_age_s": age_seconds(oldest, now),
        "newest_chunk": iso_time(newest),
        "newest_chunk_age_s": age_seconds(newest, now),
        "quarantine": {"files": len(quarantine),
                       "bytes": sum(_size(e) for e in quarantine),
                       "names": sorted(e.name for e in quarantine)},
        "temp_files": {"files": len(temps), "stale": len(stale),
                       "bytes": sum(_size_of(p) for p in temps)},
    }


def inspect_cache(cache_dir: str | os.PathLike, *, budget: int | None = None,
                  fingerprints: tuple[str, ...] = (), show_progress: bool = False,
                  min_free_space: int | str | None = None) -> dict:
    dirs = layout_dirs(cache_dir, fingerprints)
    return {"cache_dir": os.fspath(Path(cache_dir).resolve()), "budget": budget,
            "filesystem": filesystem(cache_dir, min_free_space),
            "layouts": [inspect_layout(d, budget=budget, show_progress=show_progress)
                        for d in dirs]}


def filesystem(cache_dir: str | os.PathLike, min_free_space: int | str | None) -> dict:
    """Free and total bytes of the cache directory's filesystem and the floor."""
    try:
        space = measure(cache_dir, min_free_space)
    except OSError as exc:
        return {"error": exc.strerror or str(exc)}
    return {"free_bytes": space.free, "total_bytes": space.total, "min_free_bytes": space.floor,
            "min_free_space": min_free_space, "below_floor": space.below_floor}


def _size(entry: os.DirEntry) -> int:
    try:
        return entry.stat(follow_symlinks=False).st_size
    except OSError:
        return 0


def _size_of(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= n:
            return f"{seconds / n:.1f} {unit}"
    return f"{seconds:.0f} s"


def format_report(report: dict) -> str:
    """The text form of ``inspect_cache``'s report."""
    lines = [f"cache dir {report['cache_dir']}: {len(report['layouts'])} layout(s)"]
    fs = report.get("filesystem", {})
    if "error" in fs:
        lines.append(f"filesystem: cannot read its free space: {fs['error']}")
    elif fs:
        state = " (BELOW THE FLOOR: hybridkv evicts and stores less)" if fs["below_floor"] else ""
        lines.append(f"filesystem: {human_bytes(fs['free_bytes'])} free of "
                     f"{human_bytes(fs['total_bytes'])}; floor (min_free_space"
                     f"{'' if fs['min_free_space'] is not None else ', default'}) "
                     f"{human_bytes(fs['min_free_bytes'])}{state}")
    for lt in report["layouts"]:
        p = lt["parallel"]
        lines.append("")
        lines.append(f"layout {lt['fingerprint']}: model {lt['model']} ({lt['dtype']}), "
                     f"tp {p['tp_size']} pp {p['pp_size']}")
        lines.append(f"  {'group':<6}{'kind':<16}{'window':>8}{'chunk tokens':>14}"
                     f"{'chunk bytes':>14}{'chunks':>9}{'bytes':>13}  newest")
        for g in lt["groups"]:
            lines.append(f"  g{g['index']:<5}{g['kind']:<16}{g['window_tokens'] or '-':>8}"
                         f"{g['chunk_tokens']:>14}{human_bytes(g['chunk_bytes']):>14}"
                         f"{g['chunks']:>9}{human_bytes(g['bytes']):>13}  {g['newest'] or '-'}")
        used = ""
        if lt["budget"] is not None:
            used = f" of budget {human_bytes(lt['budget'])} ({lt['budget_used']:.1%})"
        lines.append(f"  total: {lt['chunks']} chunks, {human_bytes(lt['bytes'])}{used}")
        lines.append(f"  oldest chunk {lt['oldest_chunk'] or '-'} ({_age(lt['oldest_chunk_age_s'])}"
                     f" ago), newest {lt['newest_chunk'] or '-'} "
                     f"({_age(lt['newest_chunk_age_s'])} ago)")
        for r in lt["ranks"]:
            src = ("index snapshot (checked against the directory listing)"
                   if r["source"] == "snapshot" else f"header scan ({r['scan_reason']})")
            lines.append(f"  rank {r['rank']}: {r['chunks']} chunks from {src}; snapshot age "
                         f"{_age(r['snapshot_age_s'])}")
        q, t = lt["quarantine"], lt["temp_files"]
        lines.append(f"  quarantined: {q['files']} file(s), {human_bytes(q['bytes'])}; temp files: "
                     f"{t['files']} ({t['stale']} stale), {human_bytes(t['bytes'])}")
    return "\n".join(lines)
