"""KV pages <-> chunk files through hybridkv.pages, against raw file I/O and plain copies.

For each chunk shape, the same payload bytes move four ways, in the same run on
the same filesystem with the same number of threads:
- hybridkv store: KV tensors (on the GPU when there is one) -> pooled host buffer
  (one staging gather + one D2H per chunk) -> ``ChunkStore.write`` (safetensors
  container, xxh3, temp file + rename);
- hybridkv load: ``ChunkStore.read_into`` the pooled buffer (verify) -> one H2D +
  scatter into the KV tensors; page cache warm, and cold (``posix_fadvise``
  DONTNEED after an fsync, no root needed);
- raw file I/O of the same bytes: one plain file per chunk, ``write`` / ``readinto``
  a preallocated buffer, warm and cold;
- a plain torch copy of the same bytes, device <-> pinned host (D2H / H2D), one
  contiguous copy per chunk: what the copy engine alone does.
After each load the KV tensors are compared with the stored pages (bit-exact).

Targets (ratios in one run; chunks >= 1 MiB, worst case named): load warm >= 0.8x
raw read warm, load cold >= 0.8x raw read cold, store >= 0.8x raw write.
Runs without vLLM, on CUDA when available (``--device cpu`` forces host tensors).

    python benchmarks/gpu_transfer.py --out F.json [--quick] [--dir DIR] [--threads 4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py, run or imported
from pagecache import drop_page_cache  # noqa: E402
from report import print_targets, save  # noqa: E402

from hybridkv.groups import GroupKind, GroupSpec, HybridLayout  # noqa: E402
from hybridkv.keys import make_key  # noqa: E402
from hybridkv.pages import host_buffer_bytes, load_chunk, make_copier, store_chunk  # noqa: E402
from hybridkv.store.chunk_store import ChunkStore  # noqa: E402

# (name, kind, layers, page bytes per layer per block, blocks per chunk): 256-token chunks
# of bf16 hybrids, as in io_throughput.py
CASES = [
    ("full_attention", GroupKind.FULL, 10, 16 * 128 * 2 * 2 * 16, 16),   # 20 MiB / chunk
    ("state_gdn", GroupKind.STATE, 3, 16 * 128 * 128 * 4, 1),            # 3 MiB / chunk
    ("small_chunk", GroupKind.FULL, 2, 4 * 64 * 2 * 2 * 16, 1),          # 32 KiB / chunk
]
GOAL = 0.8
TARGET_MIN_CHUNK = 1 << 20
#: small chunks cost per file, not per byte: cap their count to bound the run
MAX_CHUNKS = 8192


def _timed(fn, items, threads) -> float:
    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(fn, items))
    return time.perf_counter() - t


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Case:
    def __init__(self, root: Path, name, kind, layers, page, blocks, n_chunks, device,
                 threads):
        self.name, self.kind, self.page, self.blocks = name, kind, page, blocks
        self.n, self.device, self.threads = n_chunks, device, threads
        group = GroupSpec(index=0, kind=kind, block_tokens=256 // blocks, chunk_tokens=256,
                          layer_names=tuple(f"l{i}" for i in range(layers)), page_bytes=page,
                          window_tokens=None)
        self.layout = HybridLayout(model=f"gpu-bench-{name}", dtype="bfloat16", groups=(group,))
        self.chunk_bytes = layers * page * blocks
        num_blocks = n_chunks * blocks
        gen = torch.Generator(device).manual_seed(0)
        # one KV tensor per layer, blocks of a chunk scattered (a permutation), as in an engine
        self.kv = [torch.randint(-128, 128, (num_blocks, page), dtype=torch.int8,
                                 generator=gen, device=device) for _ in range(layers)]
        self.want = [t.clone() for t in self.kv]
        perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0)).tolist()
        self.chunk_blocks = [list(enumerate(perm[i * blocks:(i + 1) * blocks]))
                             for i in range(n_chunks)]
        self.refs = [[(i, page) for i in range(layers)]]
        self.root = root

    def run_once(self) -> dict[str, float]:
        d = Path(tempfile.mkdtemp(dir=self.root))
        store = ChunkStore(d / "store", self.layout)
        store.ensure_dirs()
        keys = [make_key(i.to_bytes(16, "big"), 0) for i in range(self.n)]
        for parent in {store.path(k).parent for k in keys}:
            parent.mkdir(parents=True, exist_ok=True)
        raw_dir = d / "raw"
        raw_dir.mkdir()
        raw_paths = [raw_dir / f"{i:08d}.bin" for i in range(self.n)]
        copier = make_copier(self.kv, self.refs, buffers=self.threads, max_blocks=self.blocks,
                             buffer_bytes=host_buffer_bytes(store, [[self.page] * len(self.kv)],
                                                            [0], self.blocks))
        secs: dict[str, float] = {}

        def store_one(i):
            return store_chunk(copier, store, keys[i], group_pos=0, blocks=self.chunk_blocks[i],
                               position=256, parent=None, after=mark)

        def load_one(i):
            return load_chunk(copier, store, keys[i], group_pos=0, blocks=self.chunk_blocks[i],
                              after=mark)

        mark = copier.mark()
        secs["store"] = _timed(store_one, range(self.n), self.threads)

        # raw: the same bytes per chunk from a host buffer of the chunk's size
        src = np.random.default_rng(1).integers(0, 256, self.chunk_bytes, dtype=np.uint8)

        def raw_write(i):
            fd = os.open(raw_paths[i], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(src)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)

        secs["raw_write"] = _timed(raw_write, range(self.n), self.threads)
        read_bufs = [np.empty(self.chunk_bytes, dtype=np.uint8) for _ in range(self.threads)]
        free = list(range(self.threads))

        def raw_read(i):
            slot = free.pop()
            try:
                with open(raw_paths[i], "rb", buffering=0) as f:
                    view = memoryview(read_bufs[slot])
                    while view:
                        got = f.readinto(view)
                        if not got:
                            break
                        view = view[got:]
            finally:
                free.append(slot)

        ok = True
        for temp in ("warm", "cold"):
            for t in self.kv:
                t.zero_()
            _sync(self.device)
            if temp == "cold":
                drop_page_cache([store.path(k) for k in keys])
            mark = copier.mark()
            secs[f"load_{temp}"] = _timed(load_one, range(self.n), self.threads)
            ok = ok and all(torch.equal(a, b) for a, b in zip(self.kv, self.want))
            if temp == "cold":
                drop_page_cache(raw_paths)
            secs[f"raw_read_{temp}"] = _timed(raw_read, range(self.n), self.threads)

        # plain torch copies of the same bytes, one contiguous copy per chunk
        dev = torch.empty(self.chunk_bytes, dtype=torch.uint8, device=self.device)
        host = [torch.empty(self.chunk_bytes, dtype=torch.uint8,
                            pin_memory=self.device.type == "cuda") for _ in range(2)]
        for direction in ("d2h", "h2d"):
            _sync(self.device)
            t0 = time.perf_counter()
            for i in range(self.n):
                h = host[i % 2]
                if direction == "d2h":
                    h.copy_(dev, non_blocking=True)
                else:
                    dev.copy_(h, non_blocking=True)
            _sync(self.device)
            secs[f"torch_{direction}"] = time.perf_counter() - t0
        stats = {"host_buffers": copier.pool.allocations,
                 "host_buffer_bytes": copier.pool.nbytes,
                 "events_waited": getattr(copier, "events_waited", None),
                 "staging_buffers": getattr(copier, "staging_allocations", None)}
        copier.close()
        shutil.rmtree(d, ignore_errors=True)
        secs["_ok"] = float(ok)
        self.stats = stats
        return secs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="48 MiB per case, one repeat")
    p.add_argument("--dir", default=None, help="filesystem to test (default: system temp)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=4, help="I/O threads (= host buffers)")
    p.add_argument("--mib-per-case", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=150.0,
                   help="stop repeating once this much time has gone (full run ~3 min)")
    a = p.parse_args()
    started = time.perf_counter()
    if a.threads < 1 or a.mib_per_case < 1 or a.repeats < 1:
        p.error(f"--threads, --mib-per-case and --repeats must be >= 1 "
                f"(got {a.threads}, {a.mib_per_case}, {a.repeats})")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    if a.dir is not None and not Path(a.dir).is_dir():
        p.error(f"--dir {a.dir}: not a directory")
    device = torch.device("cuda" if a.device == "cuda" or (
        a.device == "auto" and torch.cuda.is_available()) else "cpu")
    mib = 48 if a.quick else a.mib_per_case
    repeats = 1 if a.quick else a.repeats
    root = Path(tempfile.mkdtemp(prefix="hybridkv-gpu-", dir=a.dir))
    print(f"device {device}" + (f" ({torch.cuda.get_device_name(device)})"
                                if device.type == "cuda" else "")
          + f", {a.threads} threads, {mib} MiB per case, dir {root}", flush=True)
    results = []
    per_case_budget = a.budget_s / len(CASES)
    try:
        for name, kind, layers, page, blocks in CASES:
            n = min(MAX_CHUNKS, max(4, (mib << 20) // (layers * page * blocks)))
            case = Case(root, name, kind, layers, page, blocks, n, device, a.threads)
            best: dict[str, float] = {}
            ok, t_case, done = True, time.perf_counter(), 0
            for _ in range(repeats):
                secs = case.run_once()
                ok = ok and secs.pop("_ok") == 1.0
                best = {k: min(v, best.get(k, v)) for k, v in secs.items()}
                done += 1
                if time.perf_counter() - t_case > per_case_budget:
                    break
            total = case.chunk_bytes * n
            gbps = {k: total / v / 1e9 for k, v in best.items()}
            r = {"case": name, "chunk_bytes": case.chunk_bytes, "chunks": n,
                 "repeats": done, "bit_exact": ok, "GBps": {k: round(v, 3)
                                                            for k, v in gbps.items()},
                 "ratio": {"store_vs_raw_write": round(gbps["store"] / gbps["raw_write"], 3),
                           "load_warm_vs_raw_read": round(gbps["load_warm"]
                                                          / gbps["raw_read_warm"], 3),
                           "load_cold_vs_raw_read": round(gbps["load_cold"]
                                                          / gbps["raw_read_cold"], 3)},
                 "copier": case.stats}
            results.append(r)
            g, q = r["GBps"], r["ratio"]
            print(f"{name:<15} chunk {case.chunk_bytes / 2**20:6.2f} MiB x{n:<5} "
                  f"store {g['store']:6.2f} GB/s (raw write {g['raw_write']:6.2f}, "
                  f"x{q['store_vs_raw_write']:.2f})  load warm {g['load_warm']:6.2f} "
                  f"(raw {g['raw_read_warm']:6.2f}, x{q['load_warm_vs_raw_read']:.2f})  "
                  f"cold {g['load_cold']:6.2f} (raw {g['raw_read_cold']:6.2f}, "
                  f"x{q['load_cold_vs_raw_read']:.2f})  torch d2h {g['torch_d2h']:6.2f} "
                  f"h2d {g['torch_h2d']:6.2f}  bit-exact {ok}", flush=True)
            del case
    finally:
        shutil.rmtree(root, ignore_errors=True)

    targets = {}
    big = [r for r in results if r["chunk_bytes"] >= TARGET_MIN_CHUNK]
    for tname, ratio in (("load_warm_vs_raw_read", "load_warm_vs_raw_read"),
                         ("load_cold_vs_raw_read", "load_cold_vs_raw_read"),
                         ("store_vs_raw_write", "store_vs_raw_write")):
        worst = min(big, key=lambda r: r["ratio"][ratio])
        figure = worst["ratio"][ratio]
        targets[f"{device.type}_{tname}"] = {
            "figure": figure, "goal": f">= {GOAL}", "met": figure >= GOAL,
            "worst_cell": worst["case"]}
    exact = all(r["bit_exact"] for r in results)
    targets[f"{device.type}_bit_exact"] = {"figure": int(exact), "goal": "1", "met": exact}
    print_targets(targets)
    save(Path(a.out), "gpu_transfer", quick=a.quick, started=started,
         device=str(device), torch=torch.__version__,
         gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
         threads=a.threads, mib_per_case=mib, results=results,
         targets=targets)
    if not exact:
        sys.exit("gpu_transfer: a loaded page differs from the stored one")


if __name__ == "__main__":
    main()
