"""Time to a ready index at restart: from the index snapshot vs the full header scan.

Builds a cache directory of real chunk files (``ChunkStore.write``, one-block
payloads) for a three-group layout, then times the whole start of
``HybridKVManager`` (its ``__init__``: ``snapshot.restore`` with the stale
temp-file cleanup, ``ChunkIndex.load``, the capacity policy, the budget check;
no vLLM engine, fleet off), phase by phase from ``startup_seconds``. Each
variant runs ``--repeat`` times, a start from the snapshot (short) three times as
often (median reported, page cache warm):

- ``full_scan``: snapshots off (every header read);
- ``snapshot``: the snapshot, names checked against the directory listing
  (size/mtime/position/parent are checked per chunk at its first HIT:
  ``recheck_us_per_key`` measures that);
- ``snapshot_stat_all``: ``restore(check_stats=True)`` + ``ChunkIndex.load``
  (a ``stat`` of every file at start; not what the manager does);
- ``snapshot_after_changes``: after some files were added, removed and
  rewritten since the snapshot (the result is checked against a full scan).

It also times taking a snapshot (``index.records()`` on the scheduler thread,
then encoding + writing, which the manager does in a background thread).
Figures at 1M chunks are extrapolated linearly from the measured size.

    python benchmarks/restart.py --out FILE.json [--quick] [--chunks N] [--dir D]

--quick: 20K chunks (about a minute on 2 shared cores); default 100K.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hybridkv.config import HybridKVConfig
from hybridkv.groups import GroupKind, GroupSpec, HybridLayout
from hybridkv.index import ChunkIndex
from hybridkv.keys import make_key
from hybridkv.policies import make_policy
from hybridkv.store.chunk_store import ChunkStore
from hybridkv.store.snapshot import full_scan, recheck, restore, write_snapshot

MILLION = 1_000_000
GOAL_RESTART_1M_S = 5.0


def layout() -> HybridLayout:
    return HybridLayout(model="restart-bench", dtype="bfloat16", groups=(
        GroupSpec(index=0, kind=GroupKind.FULL, block_tokens=16, chunk_tokens=16,
                  layer_names=("l0",), page_bytes=64),
        GroupSpec(index=1, kind=GroupKind.SLIDING, block_tokens=16, chunk_tokens=16,
                  layer_names=("l1",), page_bytes=64, window_tokens=32),
        GroupSpec(index=2, kind=GroupKind.STATE, block_tokens=16, chunk_tokens=16,
                  layer_names=("m2",), page_bytes=96),
    ))


def build(store: ChunkStore, chunks: int, seed: int = 0) -> list[bytes]:
    """``chunks`` chunk files: chains of 20 prefix positions, a chunk per group at each."""
    rng = np.random.default_rng(seed)
    arrays = {g.index: [rng.integers(0, 256, (1, g.page_bytes), dtype=np.uint8)]
              for g in store.layout.groups}
    keys: list[bytes] = []
    while len(keys) < chunks:
        parents: dict[int, bytes | None] = {g.index: None for g in store.layout.groups}
        for depth in range(20):
            h = rng.bytes(16)
            for g in store.layout.groups:
                if len(keys) >= chunks:
                    break
                key = make_key(h, g.index)
                store.write(key, position=(depth + 1) * 16, block_offset=0,
                            arrays=arrays[g.index], parent=parents[g.index])
                parents[g.index] = key
                keys.append(key)
    return keys


def start(store: ChunkStore, *, snapshots: bool = True) -> dict:
    """``HybridKVManager.__init__`` (minus vLLM), timed by phase."""
    from hybridkv.vllm.manager import HybridKVManager  # imports vLLM: not timed

    config = HybridKVConfig(cache_dir=str(store.paths.cache_dir), disk_budget=2**50,
                            fleet="off", snapshot_interval=300.0 if snapshots else 0.0)
    policy = make_policy(config.eviction_policy, store.layout)
    t0 = time.perf_counter()
    mgr = HybridKVManager(store, config, policy=policy)
    total = time.perf_counter() - t0
    phases = {f"{k}_s": v for k, v in mgr.startup_seconds.items() if k != "total"}
    return {"total_s": total, **phases, "chunks": len(mgr.index),
            "source": "snapshot" if mgr.counters.get("startup_from_snapshot") else "scan",
            "unchecked": len(mgr.cache.presence.unchecked), "_index": mgr.index}


def start_stat_all(store: ChunkStore) -> dict:
    """``restore(check_stats=True)`` + ``ChunkIndex.load``: a ``stat`` of every file."""
    t0 = time.perf_counter()
    restored = restore(store, check_stats=True, clean_temp=True, log_every=3600)
    t1 = time.perf_counter()
    index = ChunkIndex()
    index.load(restored.records, by_mtime=False)
    t2 = time.perf_counter()
    return {"total_s": t2 - t0, "restore_s": t1 - t0, "index_load_s": t2 - t1,
            **{f"restore.{k}_s": v for k, v in restored.phases.items()},
            "chunks": len(index), "source": restored.source, "kept": restored.kept,
            "added": restored.added, "dropped": restored.dropped, "changed": restored.changed,
            "unchecked": len(restored.unchecked), "_index": index}


def restored_counts(store: ChunkStore) -> dict:
    """What ``restore`` found (kept, added, dropped): the manager logs but keeps no copy."""
    r = restore(store, log_every=3600)
    return {"kept": r.kept, "added": r.added, "dropped": r.dropped, "changed": r.changed}


def median_run(run, repeat: int) -> dict:
    runs = [run() for _ in range(repeat)]
    best = sorted(runs, key=lambda r: r["total_s"])[len(runs) // 2]
    out = dict(best)
    for phase in best:
        if phase.endswith("_s"):
            out[phase] = statistics.median(r.get(phase, 0.0) for r in runs)
    return out


def phase_line(r: dict) -> str:
    """``restore 0.123s (read .., validate .., ...), index_load ..`` of one variant."""
    top = [k for k in r if k.endswith("_s") and k != "total_s" and "." not in k]
    parts = []
    for k in top:
        subs = [s for s in r if s.startswith(k[:-2] + ".")]
        inner = ", ".join(f"{s.split('.', 1)[1][:-2]} {r[s]:.3f}" for s in subs)
        parts.append(f"{k[:-2]} {r[k]:.3f}s" + (f" ({inner})" if inner else ""))
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help="20K chunks instead of 100K")
    ap.add_argument("--chunks", type=int, help="number of chunk files (overrides --quick)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", help="empty directory to build the cache in (default: a temp dir)")
    args = ap.parse_args(argv)
    n = args.chunks or (20_000 if args.quick else 100_000)
    if n < 100 or args.repeat < 1:
        print("error: --chunks must be >= 100 and --repeat >= 1", file=sys.stderr)
        return 2
    if args.dir and Path(args.dir).exists() and any(Path(args.dir).iterdir()):
        print(f"error: --dir {args.dir} is not empty", file=sys.stderr)
        return 2
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="hybridkv-restart-"))
    try:
        return run(root, n, args.repeat, args.out)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(root: Path, n: int, repeat: int, out_path: str) -> int:
    store = ChunkStore(root, layout())
    store.ensure_dirs()
    t = time.perf_counter()
    keys = build(store, n)
    build_s = time.perf_counter() - t
    scale = MILLION / n
    fast_repeat = 3 * repeat  # starts from the snapshot are short: more runs, steadier median
    print(f"built {n} chunk files in {build_s:.1f}s under {root}")

    scan = median_run(lambda: start(store, snapshots=False), repeat)
    index = scan.pop("_index")

    # taking a snapshot: records() on the scheduler thread, encode + write in the background
    t = time.perf_counter()
    records = index.records()
    t_records = time.perf_counter() - t
    t = time.perf_counter()
    nbytes = write_snapshot(store, records)
    t_write = time.perf_counter() - t

    snap = median_run(lambda: start(store), fast_repeat)
    assert snap["source"] == "snapshot" and snap["chunks"] == n, snap
    assert snap.pop("_index").records() == records, "recency order lost"
    snap.update(restored_counts(store))
    stat_all = median_run(lambda: start_stat_all(store), repeat)
    stat_all.pop("_index")

    # the per-key check a restored chunk gets before its first HIT: a stat only, and
    # what the manager does (the header read too: position and parent compared)
    sample = [index.get(k) for k in sorted(e.key for e in index)[: min(n, 5000)]]
    t = time.perf_counter()
    assert all(recheck(store, e.key, e.size, e.mtime_ns)[0] for e in sample)
    recheck_stat_us = (time.perf_counter() - t) / len(sample) * 1e6
    t = time.perf_counter()
    assert all(recheck(store, e.key, e.size, e.mtime_ns, position=e.position,
                       parent=e.parent)[0] for e in sample)
    recheck_us = (time.perf_counter() - t) / len(sample) * 1e6

    # files added, removed and rewritten since the snapshot
    k = max(10, n // 1000)
    rng = np.random.default_rng(1)
    added = build(store, k, seed=2)
    gone = [keys[i] for i in rng.choice(len(keys), size=k, replace=False)]
    for key in gone:
        store.delete(key)
    alive = sorted(set(keys) - set(gone))
    rewritten = [alive[i] for i in rng.choice(len(alive), size=k, replace=False)]
    for key in rewritten:
        rec = store.describe(key)
        g = store.layout.group(rec.group)
        store.delete(key)
        store.write(key, position=rec.position, block_offset=0, parent=rec.parent,
                    arrays=[np.zeros((1, g.page_bytes), np.uint8)] * len(g.layer_names))
    changes = median_run(lambda: start(store), fast_repeat)
    changes.update(restored_counts(store))
    truth = {(r.key, r.size, r.mtime_ns) for r in full_scan(store)}
    got_index = changes.pop("_index")
    assert {e.key for e in got_index} == {key for key, _, _ in truth}
    assert (changes["added"], changes["dropped"]) == (len(added), len(gone)), changes
    stale = [got_index.get(key) for key in rewritten]
    fixed = [recheck(store, e.key, e.size, e.mtime_ns, position=e.position,
                     parent=e.parent)[1] for e in stale]
    assert all(r is not None and (r.key, r.size, r.mtime_ns) in truth for r in fixed)
    changes_stat = median_run(lambda: start_stat_all(store), repeat)
    changes_stat.pop("_index")
    assert changes_stat["changed"] == len(rewritten)

    x1m = snap["total_s"] * scale
    figures = {
        "chunks": n, "build_s": build_s, "repeat": repeat, "repeat_from_snapshot": fast_repeat,
        "full_scan": scan, "snapshot": snap, "snapshot_stat_all": stat_all,
        "snapshot_after_changes": {**changes, "files_added": k, "files_removed": k,
                                   "files_rewritten": k},
        "snapshot_after_changes_stat_all": changes_stat,
        "snapshot_bytes": nbytes, "snapshot_bytes_per_chunk": nbytes / n,
        "take_records_s": t_records, "encode_write_s": t_write,
        "recheck_us_per_key": recheck_us, "recheck_stat_only_us_per_key": recheck_stat_us,
        "speedup_vs_full_scan": scan["total_s"] / snap["total_s"],
        "extrapolated_1M": {
            "note": f"linear extrapolation from {n} chunks (x{scale:g})",
            "restart_with_snapshot_s": x1m,
            "restart_with_snapshot_excluding_index_load_s":
                (snap["total_s"] - snap["index_load_s"]) * scale,
            "restart_with_snapshot_phases_s": {
                k: v * scale for k, v in snap.items() if k.endswith("_s")},
            "restart_with_snapshot_stat_all_s": stat_all["total_s"] * scale,
            "restart_full_scan_s": scan["total_s"] * scale,
            "take_records_s": t_records * scale, "encode_write_s": t_write * scale,
            "snapshot_mib": nbytes * scale / 2**20,
        },
    }
    print(f"{n} chunks, median of {repeat} ({fast_repeat} from the snapshot; warm page cache):")
    for name in ("full_scan", "snapshot", "snapshot_stat_all"):
        r = figures[name]
        print(f"  {name:18s} {r['total_s']:7.3f}s  {phase_line(r)}")
    c = figures["snapshot_after_changes"]
    print(f"  after +{k}/-{k}/~{k} files: {c['total_s']:.3f}s (kept {c['kept']}, "
          f"read {c['added']}, dropped {c['dropped']}; with stat_all {changes_stat['total_s']:.3f}s,"
          f" changed {changes_stat['changed']})")
    print(f"  snapshot: {nbytes / 2**20:.2f} MiB ({nbytes / n:.0f} B/chunk); records() "
          f"{t_records:.3f}s, encode+write {t_write:.3f}s; recheck at first HIT "
          f"{recheck_us:.1f} us/key (stat only {recheck_stat_us:.1f})")
    e = figures["extrapolated_1M"]
    print(f"  at 1M chunks ({e['note']}): snapshot {x1m:.1f}s (without index.load "
          f"{e['restart_with_snapshot_excluding_index_load_s']:.1f}s), stat_all "
          f"{e['restart_with_snapshot_stat_all_s']:.1f}s, full scan "
          f"{e['restart_full_scan_s']:.1f}s; records() {e['take_records_s']:.2f}s")
    print(f"  at 1M chunks, snapshot by phase: {phase_line(e['restart_with_snapshot_phases_s'])}")
    print(f"speedup_vs_full_scan: {figures['speedup_vs_full_scan']:.1f}x (same run)")
    met = x1m <= GOAL_RESTART_1M_S
    line = (f"target restart_with_snapshot_1M_extrapolated: {x1m:.2f} s "
            f"(goal <= {GOAL_RESTART_1M_S:g} s) {'MET' if met else 'MISSED'}")
    print(line)
    figures["targets"] = {"restart_with_snapshot_1M_extrapolated": {
        "figure": x1m, "goal": f"<= {GOAL_RESTART_1M_S:g} s", "met": met, "line": line,
        "extrapolated_from_chunks": n}}
    figures["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "python": platform.python_version()}
    Path(out_path).write_text(json.dumps(figures, indent=2, default=str))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
