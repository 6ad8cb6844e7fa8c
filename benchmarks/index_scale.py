"""Index size and lookup rate at production scale.

Builds a ``ChunkIndex`` of N chunks with vLLM-shaped keys (a 32-byte block hash +
4-byte group index, 36 bytes, as vLLM's default sha256 prefix hashing gives) in
prefix chains of three groups (full attention, sliding window, state), and measures:

1. bytes per stored chunk, keys included (tracemalloc: everything allocated while
   the index is filled, minus what is freed);
2. ``HybridKVManager.lookup`` calls per second on stored keys (the scheduler's hot
   path: vLLM asks for every chunk of every waiting request), and on keys that are
   not stored (with ``refresh_interval`` 0, so no disk is touched).

    python benchmarks/index_scale.py --out FILE.json [--quick] [--chunks N]

Targets: <= 200 bytes per chunk and >= 1M lookups/s, at 1M chunks (quick: 200K chunks).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py, run or imported
from report import print_targets, save  # noqa: E402

GROUPS = 3
CHAIN = 64  # chunks per prefix chain (a 16K-token prompt of 256-token chunks)


def fill(index, n: int, seed: int = 0) -> list[bytes]:
    """Add about ``n`` chunks; returns every stored key (created inside the caller's trace)."""
    from hybridkv.keys import make_key

    keys: list[bytes] = []
    i = 0
    while len(keys) < n:
        parents: list[bytes | None] = [None] * GROUPS
        for depth in range(CHAIN):
            block_hash = (seed << 96 | i << 32 | depth).to_bytes(32, "big")
            for g in range(GROUPS):
                key = make_key(block_hash, g)
                index.add(key, group=g, position=(depth + 1) * 256, size=2_000_000 + 4096 * g,
                          parent=parents[g], mtime_ns=1_700_000_000_000_000_000 + len(keys))
                parents[g] = key
                keys.append(key)
        i += 1
    return keys


def measure_memory(n: int) -> dict:
    from hybridkv.index import ChunkIndex

    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    index = ChunkIndex()
    keys = fill(index, n)
    traced_with_list = tracemalloc.get_traced_memory()[0] - before
    # the list of keys is the benchmark's, not the index's
    list_bytes = sys.getsizeof(keys)
    count = len(index)
    del keys
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del index
    return {"chunks": count, "key_bytes": 36, "traced_bytes": traced,
            "bytes_per_chunk": traced / count,
            "traced_with_key_list": traced_with_list, "key_list_bytes": list_bytes}


def measure_lookups(n: int, rounds: int) -> dict:
    from vllm.v1.kv_offload.base import LookupResult, ReqContext

    from hybridkv.config import HybridKVConfig
    from hybridkv.groups import GroupKind, GroupSpec, HybridLayout
    from hybridkv.keys import make_key
    from hybridkv.store.chunk_store import ChunkStore
    from hybridkv.vllm.manager import HybridKVManager

    layout = HybridLayout(model="bench", dtype="bfloat16", groups=(
        GroupSpec(index=0, kind=GroupKind.FULL, block_tokens=256, chunk_tokens=256,
                  layer_names=("l0",), page_bytes=1024),
        GroupSpec(index=1, kind=GroupKind.SLIDING, block_tokens=256, chunk_tokens=256,
                  layer_names=("l1",), page_bytes=1024, window_tokens=1024),
        GroupSpec(index=2, kind=GroupKind.STATE, block_tokens=256, chunk_tokens=256,
                  layer_names=("l2",), page_bytes=1024)))
    with tempfile.TemporaryDirectory(prefix="hybridkv-index-") as tmp:
        store = ChunkStore(tmp, layout)
        store.ensure_dirs()
        config = HybridKVConfig.from_extra_config({"cache_dir": tmp, "refresh_interval": 0})
        manager = HybridKVManager(store, config)
        keys = fill(manager.index, n)
        missing = [make_key((7 << 200 | i).to_bytes(32, "big"), i % GROUPS)
                   for i in range(min(len(keys), 200_000))]
        ctx = ReqContext(req_id="bench")
        lookup = manager.lookup
        best_hit = best_miss = 0.0
        for _ in range(rounds):
            t = time.perf_counter()
            hits = sum(1 for k in keys if lookup(k, ctx) is LookupResult.HIT)
            best_hit = max(best_hit, len(keys) / (time.perf_counter() - t))
            assert hits == len(keys), "every stored key must be a HIT"
            t = time.perf_counter()
            misses = sum(1 for k in missing if lookup(k, ctx) is LookupResult.MISS)
            best_miss = max(best_miss, len(missing) / (time.perf_counter() - t))
            assert misses == len(missing), "no unknown key may be a HIT"
        manager.shutdown()
    return {"chunks": len(keys), "rounds": rounds, "hit_lookups_per_s": best_hit,
            "miss_lookups_per_s": best_miss}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--chunks", type=int, default=None,
                    help="chunks to index (default 1M; --quick 200K)")
    args = ap.parse_args(argv)
    n = args.chunks or (200_000 if args.quick else 1_000_000)
    if n < 1000:
        ap.error(f"--chunks {n}: at least 1000")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    started = time.perf_counter()
    mem = measure_memory(n)
    print(f"index of {mem['chunks']:,} chunks (36-byte keys): "
          f"{mem['bytes_per_chunk']:.0f} bytes per chunk, keys included "
          f"({mem['traced_bytes'] / 2**20:.0f} MiB)")
    looks = measure_lookups(n, rounds=2 if args.quick else 3)
    print(f"HybridKVManager.lookup over {looks['chunks']:,} chunks: "
          f"{looks['hit_lookups_per_s'] / 1e6:.2f}M hits/s, "
          f"{looks['miss_lookups_per_s'] / 1e6:.2f}M misses/s")
    scale_note = "" if n >= 1_000_000 else f" (measured at {mem['chunks']:,} chunks, not 1M)"
    targets = {
        "index_bytes_per_chunk": {
            "figure": round(mem["bytes_per_chunk"], 1), "goal": "<= 200",
            "met": mem["bytes_per_chunk"] <= 200, "chunks": mem["chunks"]},
        "lookups_per_s": {
            "figure": round(looks["hit_lookups_per_s"]), "goal": ">= 1000000",
            "met": looks["hit_lookups_per_s"] >= 1e6, "chunks": looks["chunks"]},
    }
    print_targets(targets, scale_note)
    return save(args.out, "index_scale", quick=args.quick, started=started,
                memory=mem, lookups=looks, targets=targets)


if __name__ == "__main__":
    main()
