"""Chunk store and load throughput: hybridkv vs raw sequential I/O vs vLLM's FS tier.

For chunk sizes typical of each group kind, the same bytes go, on the same
filesystem and in the same run (this machine is shared and noisy: compare the
ratios, not the GB/s):

1. single thread, buffered: ``ChunkStore.write`` / ``ChunkStore.read_into`` (a
   reused buffer; verification on: header checks + xxh3) against raw files
   written with ``os.write`` and read with ``os.preadv`` into a reused buffer;
   reads "warm" (page cache) and "cold" (``posix_fadvise(DONTNEED)`` after an
   fsync, no root needed). ``ChunkStore.read`` (allocates per chunk) is shown
   beside raw ``f.read()`` (allocates too). The integrity key's cost: the same
   store/read with ``integrity_key`` set (HMAC-SHA256 over every byte).
2. the same single thread with O_DIRECT (``io_mode="direct"``) against raw
   O_DIRECT of the page-rounded bytes (no warm/cold: O_DIRECT skips the cache).
3. side by side with vLLM's FS tier (``vllm.v1.kv_offload.tiering.fs.io``
   ``batch_store_block`` / ``batch_load_block``, its C routines when built):
   THREADS threads on each side, the chunks split evenly, mode-matched:
   vLLM ``use_o_direct=True`` against hybridkv ``io_mode="direct"``, and
   ``use_o_direct=False`` against ``io_mode="buffered"`` (loads cold), round by
   round in turns. vLLM
   writes raw blocks with no header or checksum and loads them unverified;
   hybridkv verifies every load.

Targets (``target`` lines; JSON ``targets``): store and load >= 0.9x raw for
chunks >= 1 MiB warm and cold, >= 0.5x raw for 32 KiB chunks; >= 1.0x vLLM's FS
tier at equal chunk size, threads and mode, verification on.

    python benchmarks/io_throughput.py --out io.json [--dir /mnt/nvme/tmp] [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py, run or imported
from pagecache import drop_page_cache  # noqa: E402
from report import print_targets, save  # noqa: E402

from hybridkv.groups import GroupKind, GroupSpec, HybridLayout  # noqa: E402
from hybridkv.keys import make_key  # noqa: E402
from hybridkv.store.chunk_store import ChunkStore  # noqa: E402
from hybridkv.store.direct import (  # noqa: E402
    O_DIRECT, align_up, aligned_empty, direct_supported)

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
BIG = 1 << 20  # chunks of at least this many bytes get the 0.9x target
KEY = b"benchmark-integrity-key-32-bytes"


def _raw_write(paths, payloads, direct: bool = False) -> None:
    """Plain files of the same bytes; O_DIRECT writes the page-rounded chunk from an
    aligned buffer (prepared outside the timing, in ``payloads``)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (O_DIRECT if direct else 0)
    for p, data in zip(paths, payloads):
        fd = os.open(p, flags, 0o600)
        try:
            for arr in data:  # the same buffers, written back to back, no copy
                view = memoryview(arr).cast("B")
                while view:
                    view = view[os.write(fd, view):]
        finally:
            os.close(fd)


def _raw_read_into(paths, buf, direct: bool = False) -> None:
    view = memoryview(buf)
    flags = os.O_RDONLY | (O_DIRECT if direct else 0)
    for p in paths:
        fd = os.open(p, flags)
        try:
            size = os.fstat(fd).st_size
            want = align_up(size) if direct else size
            got = 0
            while got < size:
                n = os.preadv(fd, [view[got:want]], got)
                if n <= 0:
                    break
                got += n
        finally:
            os.close(fd)


def _raw_read_alloc(paths) -> None:
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            f.read()


def _timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def _touched(nbytes: int) -> np.ndarray:
    """A reused read buffer, its pages faulted in up front (else whoever reads into it
    first pays the page faults: a one-time cost that is no part of either side)."""
    buf = aligned_empty(nbytes)
    buf[:] = 0
    return buf


def _vllm_io():
    try:
        from vllm.v1.kv_offload.tiering.fs import io as fs_io
    except Exception as exc:  # pragma: no cover - vLLM is a dependency of the benchmark
        return None, f"cannot import vLLM's FS tier: {exc}"
    return fs_io, "C routines (vllm.fs_io_C)" if fs_io._HAS_FSIO_C else "Python fallback"


class Case:
    """One chunk shape: its layout, stores and the payload bytes (one contiguous buffer,
    as a KV cache holds it; each chunk's layers are views into it)."""

    def __init__(self, root: Path, name, kind, layers, page, blocks, n_chunks):
        self.name, self.kind, self.n = name, kind, n_chunks
        self.chunk_bytes = layers * page * blocks
        group = GroupSpec(index=0, kind=kind, block_tokens=256 // blocks, chunk_tokens=256,
                          layer_names=tuple(f"l{i}" for i in range(layers)), page_bytes=page,
                          window_tokens=1024 if kind is GroupKind.SLIDING else None)
        self.layout = HybridLayout(model=f"bench-{name}", dtype="bfloat16", groups=(group,))
        self.kv = aligned_empty(self.chunk_bytes * n_chunks)
        self.kv[:] = np.random.default_rng(0).integers(0, 256, self.kv.nbytes, dtype=np.uint8)
        self.payloads = [[self.kv[c * self.chunk_bytes + i * page * blocks:
                                  c * self.chunk_bytes + (i + 1) * page * blocks]
                          .reshape(blocks, page) for i in range(layers)]
                         for c in range(n_chunks)]
        # hashed like vLLM's block hashes, so files spread over the <hh>/ directories
        self.keys = [make_key(hashlib.sha256(i.to_bytes(8, "big")).digest(), 0)
                     for i in range(n_chunks)]
        self.root = root

    def store(self, sub: str, **kw) -> ChunkStore:
        s = ChunkStore(self.root / sub, self.layout, **kw)
        s.ensure_dirs()
        for d in {s.path(k).parent for k in self.keys}:
            d.mkdir(parents=True, exist_ok=True)
        return s

    def raw_paths(self, sub: str) -> list[Path]:
        d = self.root / sub
        paths = [d / f"{i % 256:02x}" / f"{i:08d}.bin" for i in range(self.n)]
        for p in {p.parent for p in paths}:
            p.mkdir(parents=True, exist_ok=True)
        return paths

    def write_all(self, store: ChunkStore, idx=None) -> None:
        for i in (range(self.n) if idx is None else idx):
            store.write(self.keys[i], position=256, block_offset=0, arrays=self.payloads[i])

    def read_all(self, store: ChunkStore, buf, idx=None) -> None:
        for i in (range(self.n) if idx is None else idx):
            store.read_into(self.keys[i], buf)

    def read_alloc(self, store: ChunkStore) -> None:
        for k in self.keys:
            store.read(k)

    def store_files(self, store: ChunkStore) -> list[Path]:
        return [store.path(k) for k in self.keys]


def bench_single(case: Case, repeats: int, direct: bool) -> dict:
    """Single thread, sequential: hybridkv vs raw, chunk by chunk in turn (who goes first
    alternates), so that both see the same moment of a shared, noisy machine; the
    integrity-keyed store takes the third turn. Best of ``repeats`` (fresh files each)."""
    best: dict[str, float] = {}
    buf = _touched(ChunkStore(case.root, case.layout).max_file_bytes(0))
    raw_payloads = case.payloads
    if direct:  # raw O_DIRECT needs one aligned, page-rounded buffer per chunk
        raw_payloads = []
        for c in range(case.n):
            a = aligned_empty(align_up(case.chunk_bytes))
            a[:case.chunk_bytes] = case.kv[c * case.chunk_bytes:(c + 1) * case.chunk_bytes]
            raw_payloads.append([a])
    mode = "direct" if direct else "buffered"
    keyed_on = not direct
    for r in range(repeats):
        tag = f"{mode}{r}"
        store = case.store(f"hkv-{tag}", io_mode=mode)
        keyed = case.store(f"key-{tag}", integrity_key=KEY) if keyed_on else None
        raw = case.raw_paths(f"raw-{tag}")
        ops = {
            "write": (lambda i: case.write_all(store, (i,)),
                      lambda i: _raw_write(raw[i:i + 1], raw_payloads[i:i + 1], direct),
                      lambda i: case.write_all(keyed, (i,))),
            "read": (lambda i: case.read_all(store, buf, (i,)),
                     lambda i: _raw_read_into(raw[i:i + 1], buf, direct),
                     lambda i: case.read_all(keyed, buf, (i,))),
            "read_alloc": (lambda i: store.read(case.keys[i]),
                           lambda i: _raw_read_alloc(raw[i:i + 1]), None),
        }
        phases = [("write", "write")]
        phases += [("read", "read_cold")] if direct else [("read", "read_warm"),
                                                         ("read", "read_cold"),
                                                         ("read_alloc", "read_alloc_warm")]
        for op, label in phases:
            if label.endswith("cold"):
                files = case.store_files(store) + raw
                if keyed is not None:
                    files += case.store_files(keyed)
                drop_page_cache(files)
            elif op == "write":
                os.sync()  # no earlier writeback throttles this phase
            hkv, rawf, key_f = ops[op]
            spent = [0.0, 0.0, 0.0]
            for i in range(case.n):
                turn = [(0, hkv), (1, rawf)] if (i + r) % 2 == 0 else [(1, rawf), (0, hkv)]
                if key_f is not None and keyed is not None:
                    turn.append((2, key_f))
                for who, fn in turn:
                    t = time.perf_counter()
                    fn(i)
                    spent[who] += time.perf_counter() - t
            for who, name in enumerate(("store", "raw", "keyed")):
                if spent[who]:
                    k = f"{name}_{label}"
                    best[k] = min(best.get(k, float("inf")), spent[who])
        for sub in (f"hkv-{tag}", f"raw-{tag}", f"key-{tag}"):
            shutil.rmtree(case.root / sub, ignore_errors=True)
    total = case.chunk_bytes * case.n
    gbps = {k: round(total / v / 1e9, 3) for k, v in best.items()}
    ratio = {}
    for label in ("write", "read_warm", "read_cold", "read_alloc_warm"):
        if f"store_{label}" in gbps:
            ratio[label] = gbps[f"store_{label}"] / gbps[f"raw_{label}"]
        if f"keyed_{label}" in gbps:
            ratio[f"keyed_{label}_vs_unkeyed"] = gbps[f"keyed_{label}"] / gbps[f"store_{label}"]
    return {"mode": mode, "GBps": gbps, "ratio": {k: round(v, 3) for k, v in ratio.items()}}


def bench_vs_vllm(case: Case, fs_io, threads: int, repeats: int, direct: bool) -> dict:
    """THREADS threads each side; hybridkv store + verified load vs vLLM's batch routines.

    The chunks go in rounds (about 4 MiB per thread, at least one chunk each); within a
    round both sides take a turn (who goes first alternates), so both see the same
    moment of a shared machine. Each thread of a side handles its share of the round
    (vLLM: one ``batch_*_block`` call, as its tier issues one per job)."""
    mode = "direct" if direct else "buffered"
    per_thread = max(1, (4 << 20) // case.chunk_bytes)
    rounds = [list(range(lo, min(case.n, lo + per_thread * threads)))
              for lo in range(0, case.n, per_thread * threads)]
    max_bytes = ChunkStore(case.root, case.layout).max_file_bytes(0)
    bufs = [_touched(max_bytes) for _ in range(threads)]
    view = memoryview(case.kv)
    best: dict[str, float] = {}

    with ThreadPoolExecutor(max_workers=threads) as pool:
        def run_all(fn, args_per_part):
            t = time.perf_counter()
            list(pool.map(lambda a: fn(*a), args_per_part))
            return time.perf_counter() - t

        for r in range(repeats):
            tag = f"{mode}{r}"
            store = case.store(f"t-hkv-{tag}", io_mode=mode)
            vpaths = [str(p) for p in case.raw_paths(f"t-vllm-{tag}")]
            spent = {"hybridkv_store": 0.0, "vllm_store": 0.0,
                     "hybridkv_load": 0.0, "vllm_load": 0.0}
            for op in ("store", "load"):
                if op == "store":
                    os.sync()  # no earlier writeback throttles the stores
                else:
                    drop_page_cache(case.store_files(store) + vpaths)
                for ri, chunks in enumerate(rounds):
                    parts = [p for p in (chunks[t::threads] for t in range(threads)) if p]
                    v_args = [([vpaths[i] for i in idx], view,
                               [i * case.chunk_bytes for i in idx], case.chunk_bytes, direct)
                              for idx in parts]
                    if op == "store":
                        h = (case.write_all, [(store, idx) for idx in parts])
                        v = (fs_io.batch_store_block, v_args)
                    else:
                        h = (case.read_all, [(store, bufs[t], idx) for t, idx in enumerate(parts)])
                        v = (fs_io.batch_load_block, v_args)
                    turns = [("hybridkv", h), ("vllm", v)]
                    for who, (fn, args) in (turns if (ri + r) % 2 == 0 else turns[::-1]):
                        spent[f"{who}_{op}"] += run_all(fn, args)
            for k, v in spent.items():
                best[k] = min(best.get(k, float("inf")), v)
            # the load must have brought back the bytes (vLLM's into the KV buffer itself)
            if not np.array_equal(store.read(case.keys[-1])[1][0], case.payloads[-1][0]):
                raise AssertionError("hybridkv load returned other bytes")
            shutil.rmtree(case.root / f"t-hkv-{tag}")
            shutil.rmtree(case.root / f"t-vllm-{tag}")
    total = case.chunk_bytes * case.n
    gbps = {k: round(total / v / 1e9, 3) for k, v in best.items()}
    return {"mode": mode, "threads": threads, "GBps": gbps, "ratio_hybridkv_vs_vllm": {
        "store": round(gbps["hybridkv_store"] / gbps["vllm_store"], 3),
        "load": round(gbps["hybridkv_load"] / gbps["vllm_load"], 3)}}


def _target(cells: dict[str, float], goal: float, why: str) -> dict:
    worst = min(cells, key=cells.get)
    t = {"figure": round(cells[worst], 3), "goal": f">= {goal}", "met": cells[worst] >= goal,
         "worst_cell": worst, "best_cell": max(cells, key=cells.get),
         "cells": {k: round(v, 3) for k, v in cells.items()}}
    if not t["met"]:
        t["reason"] = why
    return t


#: why a target may be missed (saved with a MISSED target, and printed once below the lines)
WHY_MISSED = {
    "store": "every store also hashes its whole payload (xxh3) in the writing thread, writes a "
             "header and renames a temp file; buffered writes are throttled by writeback of a "
             "shared disk",
    "load_warm": "a verified load hashes every byte on top of the kernel's page-cache copy in "
                 "the same thread, and xxh3 runs at about the copy's speed here (5-9 GB/s vs "
                 "6-10 GB/s; on the 16-core GPU host too): one thread cannot pass ~0.6x; "
                 "closing it needs the hash on a second core (pipelined pieces) or a checksum "
                 "the copy computes (CRC in the kernel / a fused C read-and-hash)",
    "load_cold": "the verification pass and per-chunk Python add to the disk time",
    "small": "at 32 KiB the fixed per-chunk cost dominates: hybridkv's Python (path, header "
             "parse and checks, views; ~30-100 us here) and a temp file + rename per store, "
             "against a raw open/read/close of ~10-70 us",
    "vllm": "vLLM's C routine loops over blocks in C and verifies nothing; hybridkv runs Python "
            "per chunk and hashes every byte (xxh3 releases the GIL only for pieces > 64 KiB, "
            "and on 2 loaded cores there is no free core for it)",
}


def targets_of(results: list[dict], have_vllm: bool) -> dict:
    t: dict[str, dict] = {}
    big = [r for r in results if r["chunk_bytes"] >= BIG]
    small = [r for r in results if r["chunk_bytes"] < BIG]
    for label, rows, goal in (("ge_1MiB", big, 0.9), ("32KiB", small, 0.5)):
        if not rows:
            continue
        for what, field in (("store", "write"), ("load_warm", "read_warm"),
                            ("load_cold", "read_cold")):
            t[f"{what}_vs_raw_{label}"] = _target(
                {r["case"]: r["buffered"]["ratio"][field] for r in rows}, goal,
                WHY_MISSED["small" if label == "32KiB" else what])
    for mode in ("buffered", "direct"):
        for what in ("store", "load"):
            cells = {r["case"]: r[f"vllm_{mode}"]["ratio_hybridkv_vs_vllm"][what]
                     for r in results if f"vllm_{mode}" in r}
            if cells:
                t[f"{what}_vs_vllm_{mode}"] = _target(cells, 1.0, WHY_MISSED["vllm"])
            elif not have_vllm or mode == "direct":
                t[f"{what}_vs_vllm_{mode}"] = {"figure": 0.0, "goal": ">= 1.0", "met": False,
                                               "note": "not measured (see 'notes')"}
    return t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--dir", default=None, help="filesystem to test (default: system temp)")
    p.add_argument("--quick", action="store_true", help="fewer bytes, one repeat")
    p.add_argument("--mib-per-case", type=int, default=None, help="default 96 (quick: 16)")
    p.add_argument("--threads", type=int, default=4, help="I/O threads on each side vs vLLM")
    p.add_argument("--repeats", type=int, default=None, help="default 3 (quick: 1)")
    a = p.parse_args()
    started = time.perf_counter()
    mib = a.mib_per_case or (16 if a.quick else 96)
    repeats = a.repeats or (1 if a.quick else 3)
    root = Path(tempfile.mkdtemp(prefix="hybridkv-io-", dir=a.dir))
    fs_io, vllm_note = _vllm_io()
    direct = direct_supported(root)
    notes = [f"vLLM FS tier: {vllm_note}",
             f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
             "(both sides take turns chunk by chunk, or round by round against vLLM, so "
             "they share the noise; compare ratios)"]
    if not direct:
        notes.append(f"{root} refuses O_DIRECT (EINVAL): direct rows skipped; hybridkv "
                     "io_mode='direct' and vLLM both fall back to buffered there")
    for n in notes:
        print(f"note: {n}")
    results = []
    try:
        for name, kind, layers, page, blocks in CASES:
            if a.quick and name == "sliding_window":
                continue  # the same shape as full_attention
            n = max((1 if a.quick else 2) * a.threads, (mib * 2**20) // (layers * page * blocks))
            n -= n % a.threads
            case = Case(root, name, kind, layers, page, blocks, n)
            row = {"case": name, "kind": kind.value, "chunk_bytes": case.chunk_bytes, "chunks": n,
                   "buffered": bench_single(case, repeats, direct=False)}
            if direct:
                row["direct"] = bench_single(case, repeats, direct=True)
            if fs_io is not None:
                row["vllm_buffered"] = bench_vs_vllm(case, fs_io, a.threads, repeats, False)
                if direct:
                    row["vllm_direct"] = bench_vs_vllm(case, fs_io, a.threads, repeats, True)
            results.append(row)
            b = row["buffered"]
            print(f"{name:<15} chunk {case.chunk_bytes / 2**20:6.2f} MiB x{n:<5} buffered 1 thread:"
                  f" store {b['GBps']['store_write']:5.2f} GB/s (raw {b['GBps']['raw_write']:5.2f},"
                  f" x{b['ratio']['write']:.2f})  load warm {b['GBps']['store_read_warm']:5.2f}"
                  f" (raw {b['GBps']['raw_read_warm']:5.2f}, x{b['ratio']['read_warm']:.2f})"
                  f"  cold {b['GBps']['store_read_cold']:5.2f} (raw {b['GBps']['raw_read_cold']:5.2f},"
                  f" x{b['ratio']['read_cold']:.2f})  read() alloc x{b['ratio']['read_alloc_warm']:.2f}",
                  flush=True)
            print(f"{'':<15} integrity key on: store x{b['ratio']['keyed_write_vs_unkeyed']:.2f},"
                  f" load warm x{b['ratio']['keyed_read_warm_vs_unkeyed']:.2f},"
                  f" cold x{b['ratio']['keyed_read_cold_vs_unkeyed']:.2f} of key off", flush=True)
            if "direct" in row:
                d = row["direct"]
                print(f"{'':<15} O_DIRECT 1 thread: store {d['GBps']['store_write']:5.2f} "
                      f"(raw {d['GBps']['raw_write']:5.2f}, x{d['ratio']['write']:.2f})  load "
                      f"{d['GBps']['store_read_cold']:5.2f} (raw {d['GBps']['raw_read_cold']:5.2f},"
                      f" x{d['ratio']['read_cold']:.2f})", flush=True)
            for mode in ("buffered", "direct"):
                v = row.get(f"vllm_{mode}")
                if v:
                    print(f"{'':<15} vs vLLM FS tier, {mode}, {a.threads} threads: store "
                          f"{v['GBps']['hybridkv_store']:5.2f} vs {v['GBps']['vllm_store']:5.2f} "
                          f"(x{v['ratio_hybridkv_vs_vllm']['store']:.2f})  load (cold) "
                          f"{v['GBps']['hybridkv_load']:5.2f} vs {v['GBps']['vllm_load']:5.2f} "
                          f"(x{v['ratio_hybridkv_vs_vllm']['load']:.2f})", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    notes.append(f"load average at end {os.getloadavg()[0]:.1f}")
    targets = targets_of(results, fs_io is not None)
    print_targets(targets)
    for name, t in targets.items():
        if "reason" in t:
            print(f"  {name} missed: {t['reason']}")
    save(Path(a.out), "io_throughput", quick=a.quick, started=started,
         dir=str(a.dir or tempfile.gettempdir()), repeats=repeats, threads=a.threads,
         direct_io=direct, notes=notes, results=results, targets=targets)


if __name__ == "__main__":
    main()
