"""Store and load throughput of hybridkv's chunk store vs raw sequential file I/O.

For chunk sizes typical of each group kind, the same bytes are written and
read (a) through ``ChunkStore`` (safetensors container + xxh3 checksum + temp
file + rename; reads verify header and checksum) and (b) as raw files with
plain ``write``/``read`` — on the same filesystem, in the same run, so the
ratio store/raw is what to compare (this machine is shared and noisy).

Reads are measured twice: "warm" (page cache) and "cold" (pages dropped with
``posix_fadvise(DONTNEED)`` after an fsync, which works without root).

    python benchmarks/io_throughput.py --out io.json [--dir /mnt/nvme/tmp] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from hybridkv.groups import GroupKind, GroupSpec, HybridLayout
from hybridkv.keys import make_key
from hybridkv.store.chunk_store import ChunkStore

# (name, kind, layers, page bytes per layer per block, blocks per chunk); one chunk =
# 256 tokens. Sizes follow real hybrids in bf16: a Gemma-3-27B full-attention group of
# 10 layers with 16 KV heads x 128 dims; its sliding groups the same per layer;
# a Jamba-like Mamba state group of 7 layers (state padded to the attention page);
# a Qwen3-Next-like gated-delta-net state (32 heads x 128 x 128 fp32 per layer... per rank).
CASES = [
    ("full_attention", GroupKind.FULL, 10, 16 * 128 * 2 * 2 * 16, 16),       # 20 MiB / chunk
    ("sliding_window", GroupKind.SLIDING, 10, 16 * 128 * 2 * 2 * 16, 16),    # 20 MiB / chunk
    ("state_mamba", GroupKind.STATE, 7, 8192 * 16 * 2 + 8192 * 4 * 2, 1),    # ~2.2 MiB / chunk
    ("state_gdn", GroupKind.STATE, 3, 16 * 128 * 128 * 4, 1),                # 3 MiB / chunk
    ("small_chunk", GroupKind.FULL, 2, 4 * 64 * 2 * 2 * 16, 1),              # 32 KiB / chunk
]


def _drop_cache(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _raw_write(paths, payloads) -> None:
    for p, data in zip(paths, payloads):
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for arr in data:  # the same buffers, written back to back, no copy
                view = memoryview(arr).cast("B")
                while view:
                    view = view[os.write(fd, view):]
        finally:
            os.close(fd)


def _raw_read(paths) -> int:
    total = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            total += len(f.read())
    return total


def bench_case(root: Path, name, kind, layers, page, blocks, n_chunks, repeats) -> dict:
    group = GroupSpec(index=0, kind=kind, block_tokens=256 // blocks, chunk_tokens=256,
                      layer_names=tuple(f"l{i}" for i in range(layers)), page_bytes=page,
                      window_tokens=1024 if kind is GroupKind.SLIDING else None)
    layout = HybridLayout(model=f"bench-{name}", dtype="bfloat16", groups=(group,))
    rng = np.random.default_rng(0)
    payloads = [[rng.integers(0, 256, (blocks, page), dtype=np.uint8) for _ in range(layers)]
                for _ in range(n_chunks)]
    chunk_bytes = layers * page * blocks
    best = {k: float("inf") for k in ("store_write", "raw_write", "store_read_warm",
                                      "raw_read_warm", "store_read_cold", "raw_read_cold")}
    for _ in range(repeats):
        case_dir = Path(tempfile.mkdtemp(dir=root))
        store = ChunkStore(case_dir / "store", layout)
        store.ensure_dirs()
        keys = [make_key(i.to_bytes(16, "big"), 0) for i in range(n_chunks)]
        raw_dir = case_dir / "raw"
        raw_dir.mkdir()
        raw_paths = [raw_dir / f"{i:08d}.bin" for i in range(n_chunks)]
        for path in {store.path(k).parent for k in keys}:
            path.mkdir(parents=True, exist_ok=True)

        t = time.perf_counter()
        for key, data in zip(keys, payloads):
            store.write(key, position=256, block_offset=0, arrays=data)
        best["store_write"] = min(best["store_write"], time.perf_counter() - t)
        t = time.perf_counter()
        _raw_write(raw_paths, payloads)
        best["raw_write"] = min(best["raw_write"], time.perf_counter() - t)

        for temp in ("warm", "cold"):
            if temp == "cold":
                _drop_cache([store.path(k) for k in keys] + raw_paths)
            t = time.perf_counter()
            for key in keys:
                store.read(key)
            best[f"store_read_{temp}"] = min(best[f"store_read_{temp}"], time.perf_counter() - t)
            if temp == "cold":
                _drop_cache(raw_paths)
            t = time.perf_counter()
            _raw_read(raw_paths)
            best[f"raw_read_{temp}"] = min(best[f"raw_read_{temp}"], time.perf_counter() - t)
        shutil.rmtree(case_dir)
    total = chunk_bytes * n_chunks
    gbps = {k: total / v / 1e9 for k, v in best.items()}
    return {
        "case": name, "kind": kind.value, "chunk_bytes": chunk_bytes, "chunks": n_chunks,
        "GBps": {k: round(v, 3) for k, v in gbps.items()},
        "ratio_store_vs_raw": {
            "write": round(gbps["store_write"] / gbps["raw_write"], 3),
            "read_warm": round(gbps["store_read_warm"] / gbps["raw_read_warm"], 3),
            "read_cold": round(gbps["store_read_cold"] / gbps["raw_read_cold"], 3),
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--dir", default=None, help="filesystem to test (default: system temp)")
    p.add_argument("--quick", action="store_true", help="fewer bytes, one repeat")
    p.add_argument("--mib-per-case", type=int, default=256)
    a = p.parse_args()
    mib = 48 if a.quick else a.mib_per_case
    repeats = 1 if a.quick else 3
    root = Path(tempfile.mkdtemp(prefix="hybridkv-io-", dir=a.dir))
    results = []
    try:
        for name, kind, layers, page, blocks in CASES:
            n = max(4, (mib * 2**20) // (layers * page * blocks))
            results.append(bench_case(root, name, kind, layers, page, blocks, n, repeats))
            r = results[-1]
            print(f"{name:<15} chunk {r['chunk_bytes'] / 2**20:7.2f} MiB x{n:<5} "
                  f"write {r['GBps']['store_write']:6.2f} GB/s (raw {r['GBps']['raw_write']:6.2f}, "
                  f"x{r['ratio_store_vs_raw']['write']:.2f})  "
                  f"read warm {r['GBps']['store_read_warm']:6.2f} (raw {r['GBps']['raw_read_warm']:6.2f},"
                  f" x{r['ratio_store_vs_raw']['read_warm']:.2f})  "
                  f"cold {r['GBps']['store_read_cold']:6.2f} (raw {r['GBps']['raw_read_cold']:6.2f}, "
                  f"x{r['ratio_store_vs_raw']['read_cold']:.2f})", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    doc = {"benchmark": "io_throughput", "host": platform.node(), "cpus": os.cpu_count(),
           "dir": str(a.dir or tempfile.gettempdir()), "quick": a.quick, "repeats": repeats,
           "results": results}
    Path(a.out).write_text(json.dumps(doc, indent=1))
    print(f"saved {a.out}")


if __name__ == "__main__":
    main()
