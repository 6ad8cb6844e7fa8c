"""``hybridkv gc``: offline cleanup of a cache directory with the engine's own policy code.

- Budget: the chunks of each rank are loaded into a ``ChunkIndex`` (from the index
  snapshot checked against the directory, else from the headers) and
  ``Capacity.enforce`` with ``make_policy(NAME)`` picks the victims, exactly as an
  engine with that ``disk_budget`` and ``eviction_policy`` would at start. The
  budget applies to each rank directory, as each engine enforces it.
- Stale temp files (writer gone, or older than an hour): ``ChunkStore.clean_temp``.
- ``purge_quarantine``: the files under ``<layout>/quarantine/`` are deleted.
- ``other_fingerprints``: whole layout directories other than the ones kept.

Invariants:
- ``dry_run`` changes nothing and reports exactly what a real run would remove
  (the same victims: the policy is deterministic over the same index).
- Only chunk files the policy names, stale temp files, quarantined files and (when
  asked) other layout directories are removed; nothing outside the layout
  directories is touched.
- Safe while engines run: an engine whose chunk is deleted under it sees a miss
  (its lookup re-checks the file, a load of a vanished file fails closed and is
  recomputed), never wrong output. Its own index and snapshot still count the
  deleted chunks until it notices them gone.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from hybridkv.capacity import Capacity
from hybridkv.cost import PrefillCost
from hybridkv.index import ChunkIndex
from hybridkv.keys import key_group
from hybridkv.policies import make_policy, policy_names
from hybridkv.tools.common import (
    LayoutDir,
    ToolError,
    human_bytes,
    is_stale_temp,
    layout_dirs,
    progress,
    quarantined_files,
    read_records,
    temp_files,
)

__all__ = ["gc_cache", "gc_layout", "format_report"]


def _dir_bytes(path: Path) -> tuple[int, int]:
    files = size = 0
    for dirpath, _dirs, names in os.walk(path):
        for n in names:
            try:
                size += os.lstat(os.path.join(dirpath, n)).st_size
                files += 1
            except OSError:
                pass
    return files, size


def gc_layout(ld: LayoutDir, *, budget: int | None, policy: str = "group_aware",
              dry_run: bool = False, purge_quarantine: bool = False,
              show_progress: bool = False) -> dict:
    layout = ld.layout
    groups = {g.index: {"index": g.index, "kind": g.kind.value, "chunks_before": 0,
                        "bytes_before": 0, "chunks_evicted": 0, "bytes_evicted": 0}
              for g in layout.groups}
    ranks = []
    for rank in ld.ranks() if budget is not None else []:
        store = ld.store(rank)
        found = read_records(store, show_progress=show_progress)
        sizes = {r.key: r.size for r in found.records}
        for r in found.records:
            groups[r.group]["chunks_before"] += 1
            groups[r.group]["bytes_before"] += r.size
        index = ChunkIndex()
        index.load(found.records, by_mtime=False)
        chosen = make_policy(policy, layout, cost=PrefillCost.from_layout(layout))
        capacity = Capacity(index, chosen, budget)
        victims = capacity.enforce()
        deleted = deleted_bytes = 0
        for key in progress(victims, total=len(victims), desc=f"evicting r{rank}",
                            enabled=show_progress and not dry_run):
            if dry_run or store.delete(key):
                deleted += 1
                deleted_bytes += sizes[key]
                g = groups[key_group(key)]
                g["chunks_evicted"] += 1
                g["bytes_evicted"] += sizes[key]
        ranks.append({"rank": rank, "source": found.source, "chunks_before": len(sizes),
                      "bytes_before": sum(sizes.values()), "chunks_evicted": deleted,
                      "bytes_evicted": deleted_bytes,
                      "bytes_after": index.bytes_used})
    stale = [p for p in temp_files(ld.path) if is_stale_temp(p)]
    if dry_run:
        temp_removed = len(stale)
    else:
        temp_removed = ld.store(ld.ranks()[0] if ld.ranks() else 0).clean_temp()
    quarantine = quarantined_files(ld.path)
    purged = purged_bytes = 0
    if purge_quarantine:
        for entry in quarantine:
            try:
                size = entry.stat(follow_symlinks=False).st_size
                if not dry_run:
                    os.unlink(entry.path)
            except OSError:
                continue
            purged += 1
            purged_bytes += size
    return {"fingerprint": ld.fingerprint, "path": os.fspath(ld.path), "model": layout.model,
            "policy": policy, "budget": budget, "groups": list(groups.values()), "ranks": ranks,
            "chunks_evicted": sum(g["chunks_evicted"] for g in groups.values()),
            "bytes_evicted": sum(g["bytes_evicted"] for g in groups.values()),
            "stale_temp_removed": temp_removed,
            "quarantine_files": len(quarantine), "quarantine_purged": purged,
            "quarantine_bytes_purged": purged_bytes}


def gc_cache(cache_dir: str | os.PathLike, *, budget: int | None = None,
             policy: str = "group_aware", dry_run: bool = False,
             purge_quarantine: bool = False, fingerprints: tuple[str, ...] = (),
             other_fingerprints: bool = False, show_progress: bool = False) -> dict:
    if policy not in policy_names():
        raise ToolError(f"--policy {policy}: unknown eviction policy; choose one of "
                        f"{', '.join(policy_names())}")
    if other_fingerprints and not fingerprints:
        raise ToolError("--other-fingerprints: name the layout(s) to keep with --fingerprint FP "
                        "(see `hybridkv inspect`)")
    kept = layout_dirs(cache_dir, fingerprints)
    removed = []
    if other_fingerprints:
        keep = {d.fingerprint for d in kept}
        for d in layout_dirs(cache_dir):
            if d.fingerprint in keep:
                continue
            files, size = _dir_bytes(d.path)
            if not dry_run:
                shutil.rmtree(d.path, ignore_errors=True)
            removed.append({"fingerprint": d.fingerprint, "model": d.layout.model,
                            "files": files, "bytes": size})
    layouts = [gc_layout(d, budget=budget, policy=policy, dry_run=dry_run,
                         purge_quarantine=purge_quarantine, show_progress=show_progress)
               for d in kept]
    return {"cache_dir": os.fspath(Path(cache_dir).resolve()), "dry_run": dry_run,
            "budget": budget, "policy": policy, "layouts": layouts,
            "other_fingerprints_removed": removed}


def format_report(report: dict) -> str:
    would = "would remove" if report["dry_run"] else "removed"
    lines = []
    for lt in report["layouts"]:
        head = f"layout {lt['fingerprint']} ({lt['model']})"
        if lt["budget"] is None:
            lines.append(f"{head}: no --budget, no eviction")
        else:
            lines.append(f"{head}: budget {human_bytes(lt['budget'])} per rank, policy "
                         f"{lt['policy']}: {would} {lt['chunks_evicted']} chunks, "
                         f"{human_bytes(lt['bytes_evicted'])}")
            lines.append(f"  {'group':<6}{'kind':<16}{'chunks':>9}{'bytes':>13}"
                         f"{'evicted':>9}{'bytes evicted':>15}")
            for g in lt["groups"]:
                lines.append(f"  g{g['index']:<5}{g['kind']:<16}{g['chunks_before']:>9}"
                             f"{human_bytes(g['bytes_before']):>13}{g['chunks_evicted']:>9}"
                             f"{human_bytes(g['bytes_evicted']):>15}")
            for r in lt["ranks"]:
                lines.append(f"  rank {r['rank']}: {human_bytes(r['bytes_before'])} -> "
                             f"{human_bytes(r['bytes_after'])} (index from {r['source']})")
        lines.append(f"  stale temp files {would}: {lt['stale_temp_removed']}; quarantined "
                     f"files: {lt['quarantine_files']}, {would} {lt['quarantine_purged']} "
                     f"({human_bytes(lt['quarantine_bytes_purged'])})")
    for d in report["other_fingerprints_removed"]:
        lines.append(f"other layout {d['fingerprint']} ({d['model']}): {would} {d['files']} "
                     f"files, {human_bytes(d['bytes'])}")
    if report["dry_run"]:
        lines.append("dry run: nothing was changed")
    return "\n".join(lines)
