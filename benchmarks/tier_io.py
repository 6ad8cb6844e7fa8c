"""HybridKVTier against vLLM's ``fs`` tier, side by side under vLLM's real tiering manager.

Both tiers are built the same way (``tests/tier_helpers.TierRig``: vLLM's real
``TieringOffloadingManager`` through its ``OffloadingSpecFactory``, a real CPU
region) with the same chunk (slot) sizes, I/O threads and buffered I/O; only the
secondary tier differs. vLLM's ``fs`` tier writes each slot raw into one file
(temp + rename) and loads it unverified with one ``readv`` into the slot;
HybridKVTier writes only the group's bytes of the slot behind a header with an
xxh3 checksum, and verifies every load (header, checksum) before it copies the
payload into the slot. This machine is shared and noisy: the two tiers take
turns (A B, then B A, ...) and the figures are medians of per-round ratios.

1. Throughput and per-key latency at chunk sizes from 64 KiB to 4 MiB (16 MiB
   in the full run), one full-attention group (the whole slot is the group's, so
   both tiers move the same bytes). The tier's own ``submit_store`` /
   ``submit_load`` are driven with ``TransferJob``s over many CPU slots (jobs of
   up to 16 keys, like vLLM's one job per request and step), the results polled
   through ``get_finished_jobs``: tier I/O, not the CPU tier's bookkeeping.
   Cascade stores, then promotions from the page cache (warm) and after
   ``posix_fadvise(DONTNEED)`` (cold); every promotion is checked byte for byte.
   Per-key latency: one-key jobs, one at a time. A single-thread breakdown of
   one chunk's store and load (raw I/O, xxh3, hybridkv's whole call, the copy
   into the slot) says where hybridkv's time goes.
2. Bytes on disk per stored token for hybrid layouts (Gemma-3-like sliding +
   full, Qwen3-Next-like state + full, Jamba-like state + full) at realistic
   page sizes: the same requests through the full cascade of both tiers
   (``TierRig.store``), then the sum of file sizes and of ``st_blocks * 512``
   under each tier's directory. hybridkv's group-aware admission may decline
   sliding-window chunks and state chunks that no later request can use: the
   JSON says how many per group. The harness's tiny layouts (4-8 KiB slots) are
   measured too, for information.
3. Restart: each hybridkv directory of (2) is opened by a new rig (a restarted
   engine), every stored key looked up and promoted, and the group's bytes of
   the slot compared with what was stored.

Targets: ``tier_store_vs_fs`` and ``tier_promote_vs_fs`` >= 1.0x vLLM's fs tier
(store, warm and cold promotion) at chunks >= 1 MiB, worst cell named;
``restart_promotion_identical``: 0 mismatching promotions; ``disk_bytes_per_token``
<= 1.0x vLLM's fs tier for the hybrid layouts (worst of file sizes and blocks).

    python benchmarks/tier_io.py --out F.json [--quick] [--dir DIR] [--threads N]
        [--rounds N] [--sizes KiB,KiB,...] [--mib-per-round N]
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py, run or imported
sys.path.insert(1, str(ROOT / "tests"))  # harness.py, tier_helpers.py

PAGE = 64 << 10  # one layer's page of one 16-token block in the throughput layout
BIG = 1 << 20  # chunks of at least this many bytes carry the >= 1.0x targets
QUICK_SIZES = (64, 1024, 4096)  # KiB
FULL_SIZES = (64, 256, 1024, 4096, 16384)
MAX_KIB = 16384
MAX_KEYS_PER_JOB = 16


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        print(f"tier_io.py: {message}", file=sys.stderr)
        sys.exit(2)


def _fail(msg: str) -> int:
    print(f"tier_io.py: {msg}", file=sys.stderr)
    return 2


def _shape(kib: int) -> tuple[int, int]:
    """(layers, blocks per chunk) of a full-attention slot of ``kib`` KiB."""
    n = kib * 1024 // PAGE
    for layers in (4, 2, 1):
        if n % layers == 0:
            return layers, n // layers
    raise AssertionError(kib)


# ---------------------------------------------------------------- rigs
def _attention(block: int, heads: int, head: int):
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    return FullAttentionSpec(block_size=block, num_kv_heads=heads, head_size=head,
                             dtype=torch.float32)


def _full_layout(layers: int):
    """``layers`` full-attention layers, 16-token blocks of 64 KiB per layer."""
    return {f"model.layers.{i}.self_attn": _attention(16, 8, 64) for i in range(layers)}, 16


def _gemma_layout():
    """Gemma-3-like: 5 sliding (window 256) per full layer; 32 KiB pages; 64-token chunks."""
    import torch
    from vllm.v1.kv_cache_interface import SlidingWindowSpec
    specs = {}
    for i in range(12):
        if i % 6 == 5:
            specs[f"model.layers.{i}.self_attn"] = _attention(16, 4, 64)
        else:
            specs[f"model.layers.{i}.self_attn"] = SlidingWindowSpec(
                block_size=16, num_kv_heads=4, head_size=64, dtype=torch.float32,
                sliding_window=256)
    return specs, 16


def _state_layout(pattern: str):
    """Qwen3-Next-like (state : full 3 : 1, Mamba2-shaped state) or Jamba-like (Mamba1,
    1 attention per 8); the attention block raised until its page holds a state, as
    vLLM does, so state pages are padded to it."""
    from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum
    from vllm.v1.kv_cache_interface import MambaSpec

    import torch
    if pattern == "qwen":
        shapes, kind, n, every, off = ((384, 3), (8, 32, 32)), "MAMBA2", 8, 4, 3
    else:
        shapes, kind, n, every, off = ((512, 3), (512, 16)), "MAMBA1", 16, 8, 4

    def state(block):
        return MambaSpec(block_size=block, shapes=shapes, dtypes=(torch.float32,) * 2,
                         mamba_type=getattr(MambaAttentionBackendEnum, kind),
                         mamba_cache_mode="align")
    per_token = _attention(1, 4, 64).page_size_bytes
    block = -(-state(16).page_size_bytes // (per_token * 16)) * 16
    name = "linear_attn" if pattern == "qwen" else "mamba"
    return {f"model.layers.{i}.{'self_attn' if i % every == off else name}":
            (_attention(block, 4, 64) if i % every == off else state(block))
            for i in range(n)}, block


#: name -> (layout builder, blocks per chunk, chunks per request, tiny TierRig layout)
DISK_LAYOUTS = {
    "gemma": (_gemma_layout, 4, 16, "gemma"),
    "qwen": (lambda: _state_layout("qwen"), 1, 16, "qwen"),
    "jamba": (lambda: _state_layout("jamba"), 1, 16, "jamba"),
}
HYBRID_TARGET_LAYOUTS = ("gemma", "qwen")


class Pair:
    """The fs rig and the hybridkv rig of one layout, on their own directories."""

    def __init__(self, work: Path, model: Path, tag: str, layout, threads: int, *,
                 cpu_bytes: int, num_blocks: int, blocks_per_chunk: int,
                 which=("fs", "hybridkv")):
        from tier_helpers import TierRig
        self.dirs = {"fs": work / f"{tag}-fs", "hybridkv": work / f"{tag}-hkv"}
        self.rigs = {}
        for who in which:
            kw = dict(cpu_bytes=cpu_bytes, num_blocks=num_blocks,
                      blocks_per_chunk=blocks_per_chunk)
            if who == "fs":
                rig = TierRig(model, work / f"{tag}-fs-conn", layout, secondary={
                    "type": "fs", "root_dir": str(self.dirs["fs"]),
                    "n_read_threads": threads, "n_write_threads": threads}, **kw)
                rig.tier._use_o_direct = False  # buffered, like hybridkv's io_mode here
            else:
                rig = TierRig(model, self.dirs["hybridkv"], layout, io_threads=threads,
                              io_mode="buffered", **kw)
            self.rigs[who] = rig

    def close(self) -> None:
        for rig in self.rigs.values():
            rig.close()


def key_path(rig, who: str, key: bytes) -> str:
    if who == "fs":
        return rig.tier.file_mapper.get_file_name(key)
    return str(rig.tier.cache.store.path(key))


# ---------------------------------------------------------------- driving a tier
_JOB_IDS = itertools.count(1 << 20)


def make_keys(tag: str, n: int) -> list[bytes]:
    import xxhash
    from vllm.v1.kv_offload.base import make_offload_key
    return [make_offload_key(xxhash.xxh3_128_digest(f"{tag}:{i}".encode()), 0)
            for i in range(n)]


def make_jobs(keys: list[bytes], slots: list[int], per_job: int, chunk_tokens: int,
              tag: str, promotion: bool):
    import numpy as np
    from vllm.v1.kv_offload.base import ReqContext
    from vllm.v1.kv_offload.tiering.base import TransferJob
    jobs = []
    for j, lo in enumerate(range(0, len(keys), per_job)):
        ks = keys[lo:lo + per_job]
        ctx = ReqContext(req_id=f"{tag}-{j}")
        for i, k in enumerate(ks):
            ctx.set_offload_key_position(k, (i + 1) * chunk_tokens)
        jobs.append(TransferJob(job_id=next(_JOB_IDS), keys=ks,
                                chunk_ids=np.array(slots[lo:lo + per_job], dtype=np.int32),
                                is_promotion=promotion, req_context=ctx))
    return jobs


def run_jobs(tier, jobs, load: bool, timeout: float = 300.0) -> dict:
    """Submit every job at once, poll ``get_finished_jobs`` until each is reported."""
    submit = tier.submit_load if load else tier.submit_store
    start: dict[int, float] = {}
    t0 = time.perf_counter()
    for job in jobs:
        start[job.job_id] = time.perf_counter()
        submit(job)
    lat: dict[int, float] = {}
    failed = 0
    deadline = t0 + timeout
    while len(lat) < len(jobs):
        for r in tier.get_finished_jobs():
            lat[r.job_id] = time.perf_counter() - start[r.job_id]
            failed += not r.success
        if len(lat) < len(jobs):
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{type(tier).__name__}: jobs did not finish")
            time.sleep(0.0005)
    wall = time.perf_counter() - t0
    for job in jobs:
        if not load:
            tier.on_request_finished(job.req_context)
    return {"seconds": wall, "failed_jobs": failed, "job_latency": list(lat.values())}


def resolve_lookups(tier, keys, ctx, timeout: float = 60.0) -> int:
    """Look each key up until HIT or MISS (as the manager does before a promotion);
    returns how many are not HIT."""
    from vllm.v1.kv_offload.base import LookupResult, ScheduleEndContext
    end = ScheduleEndContext(new_req_ids=(), preempted_req_ids=())
    deadline = time.monotonic() + timeout
    todo = list(keys)
    misses = 0
    while todo:
        left = []
        for k in todo:
            r = tier.lookup(k, ctx)
            if r == LookupResult.RETRY:
                left.append(k)
            elif r != LookupResult.HIT:
                misses += 1
        todo = left
        if todo:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{type(tier).__name__}: lookups did not resolve")
            tier.on_schedule_end(end)
            time.sleep(0.001)
    return misses


def _sync_and_settle() -> None:
    os.sync()  # no earlier writeback throttles the next phase


# ---------------------------------------------------------------- 1. throughput
def bench_size(work: Path, model: Path, kib: int, threads: int, rounds: int,
               round_bytes: int, lat_keys: int, drop_cache) -> dict:
    import numpy as np
    layers, bpc = _shape(kib)
    slot = kib * 1024
    n = max(2 * threads, round_bytes // slot)
    per_job = max(1, min(MAX_KEYS_PER_JOB, n // (2 * threads)))
    pair = Pair(work, model, f"t{kib}", _full_layout(layers), threads,
                cpu_bytes=(n + 2) * slot, num_blocks=160, blocks_per_chunk=bpc)
    rng = np.random.default_rng(kib)
    try:
        for who, rig in pair.rigs.items():
            assert rig.rows.shape[1] == slot, (who, rig.rows.shape)
            assert rig.rows.shape[0] >= n, (who, rig.rows.shape, n)
            if who == "hybridkv":
                assert rig.tier.slots.group_bytes(0) == slot
        chunk_tokens = pair.rigs["fs"].chunk_tokens[0]
        src = rng.integers(0, 256, (n, slot), dtype=np.uint8)
        for rig in pair.rigs.values():
            rig.rows[:n] = src
        order = ["hybridkv", "fs"]
        per_round = []
        mismatches = {"hybridkv": 0, "fs": 0}
        misses = {"hybridkv": 0, "fs": 0}
        failed_jobs = {"hybridkv": 0, "fs": 0}
        for r in range(rounds):
            turns = order if r % 2 == 0 else order[::-1]
            keys = make_keys(f"{kib}-{r}", n)
            slots = list(range(n))
            row = {}
            _sync_and_settle()
            for who in turns:  # cascade stores
                rig = pair.rigs[who]
                rig.rows[:n] = src
                out = run_jobs(rig.tier, make_jobs(keys, slots, per_job, chunk_tokens,
                                                   f"s{who}{kib}-{r}", False), load=False)
                row[f"{who}_store"] = out
                failed_jobs[who] += out["failed_jobs"]
            for phase in ("warm", "cold"):
                if phase == "cold":
                    for who in turns:
                        drop_cache([key_path(pair.rigs[who], who, k) for k in keys])
                for who in turns:
                    rig = pair.rigs[who]
                    ctx_jobs = make_jobs(keys, slots, per_job, chunk_tokens,
                                         f"l{who}{kib}-{r}-{phase}", True)
                    for job in ctx_jobs:
                        misses[who] += resolve_lookups(rig.tier, job.keys, job.req_context)
                    rig.rows[:n] = 0
                    out = run_jobs(rig.tier, ctx_jobs, load=True)
                    row[f"{who}_load_{phase}"] = out
                    failed_jobs[who] += out["failed_jobs"]
                    bad = int(np.count_nonzero((rig.rows[:n] != src).any(axis=1)))
                    mismatches[who] += bad
            per_round.append(row)
        lat = bench_latency(pair, kib, threads, min(lat_keys, n), chunk_tokens, src, drop_cache)
        stages = bench_stages(pair.rigs["hybridkv"], kib, src) if slot >= BIG else None
        job_stages = (bench_job_stages(pair.rigs["hybridkv"], kib, n, per_job, chunk_tokens, src)
                      if slot >= BIG else None)
    finally:
        pair.close()
        for d in (work / f"t{kib}-fs", work / f"t{kib}-hkv", work / f"t{kib}-fs-conn"):
            shutil.rmtree(d, ignore_errors=True)

    total = n * slot
    gbps = {}
    ratio = {}
    for op in ("store", "load_warm", "load_cold"):
        for who in ("hybridkv", "fs"):
            gbps[f"{who}_{op}"] = round(statistics.median(
                total / row[f"{who}_{op}"]["seconds"] / 1e9 for row in per_round), 3)
        ratio[op] = round(statistics.median(
            row[f"fs_{op}"]["seconds"] / row[f"hybridkv_{op}"]["seconds"]
            for row in per_round), 3)
    job_lat = {}
    for op in ("store", "load_warm", "load_cold"):
        for who in ("hybridkv", "fs"):
            all_lat = [x for row in per_round for x in row[f"{who}_{op}"]["job_latency"]]
            job_lat[f"{who}_{op}_median_ms"] = round(statistics.median(all_lat) * 1e3, 3)
    return {"chunk_bytes": slot, "layers": layers, "blocks_per_chunk": bpc,
            "chunk_tokens": chunk_tokens, "keys_per_round": n, "keys_per_job": per_job,
            "rounds": rounds, "GBps_median": gbps, "ratio_hybridkv_vs_fs_median": ratio,
            "round_ratios": {op: [round(row[f"fs_{op}"]["seconds"]
                                        / row[f"hybridkv_{op}"]["seconds"], 3)
                                  for row in per_round]
                             for op in ("store", "load_warm", "load_cold")},
            "job_latency_under_load": job_lat, "per_key_latency": lat,
            "promotion_mismatches": mismatches, "lookup_misses": misses,
            "failed_jobs": failed_jobs, "hybridkv_stages_1_thread": stages,
            "hybridkv_job_stages": job_stages}


def bench_latency(pair: Pair, kib: int, threads: int, n: int, chunk_tokens: int, src,
                  drop_cache) -> dict:
    """One-key jobs, one at a time, the tiers in turns: submit -> reported."""
    import numpy as np
    keys = make_keys(f"lat-{kib}", n)
    out: dict[str, list[float]] = {}
    order = ["hybridkv", "fs"]
    _sync_and_settle()
    for i, key in enumerate(keys):
        for who in (order if i % 2 == 0 else order[::-1]):
            rig = pair.rigs[who]
            rig.rows[i] = src[i]
            (job,) = make_jobs([key], [i], 1, chunk_tokens, f"ls{who}{kib}-{i}", False)
            out.setdefault(f"{who}_store", []).append(
                run_jobs(rig.tier, [job], load=False)["seconds"])
    for phase in ("warm", "cold"):
        if phase == "cold":
            for who in order:
                drop_cache([key_path(pair.rigs[who], who, k) for k in keys])
        for i, key in enumerate(keys):
            for who in (order if i % 2 == 0 else order[::-1]):
                rig = pair.rigs[who]
                (job,) = make_jobs([key], [i], 1, chunk_tokens, f"ll{who}{kib}-{i}-{phase}",
                                   True)
                resolve_lookups(rig.tier, job.keys, job.req_context)
                rig.rows[i] = 0
                out.setdefault(f"{who}_load_{phase}", []).append(
                    run_jobs(rig.tier, [job], load=True)["seconds"])
                if not np.array_equal(rig.rows[i], src[i]):
                    raise AssertionError(f"{who}: a one-key promotion brought other bytes")
    res = {"keys": n}
    for k, v in out.items():
        v = sorted(v)
        res[f"{k}_median_ms"] = round(statistics.median(v) * 1e3, 3)
        res[f"{k}_p90_ms"] = round(v[min(len(v) - 1, int(0.9 * len(v)))] * 1e3, 3)
    return res


def bench_stages(rig, kib: int, src, reps: int = 8) -> dict:
    """Single thread, one chunk at a time: where a hybridkv store / load spends its time
    next to the raw syscalls vLLM's fs tier makes (warm page cache; best of ``reps``,
    the pairs in alternating order)."""
    import numpy as np
    import xxhash
    tier = rig.tier
    store = tier.cache.store
    slots = tier.slots
    n = min(len(src), reps)
    keys = make_keys(f"stage-{kib}", n)
    raw_dir = Path(str(store.path(keys[0]))).parent.parent / "raw-stage"
    raw_dir.mkdir(parents=True, exist_ok=True)
    buf = np.zeros(store.max_file_bytes(0), dtype=np.uint8)
    row = np.zeros(src.shape[1], dtype=np.uint8)
    best: dict[str, float] = {}

    def t(name, fn):
        s = time.perf_counter()
        fn()
        best[name] = min(best.get(name, float("inf")), time.perf_counter() - s)

    def raw_write(i):
        p = raw_dir / f"{i}.bin"
        fd = os.open(f"{p}.tmp", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        os.write(fd, src[i])
        os.close(fd)
        os.replace(f"{p}.tmp", p)

    def raw_read(i):
        fd = os.open(raw_dir / f"{i}.bin", os.O_RDONLY)
        os.readv(fd, [row])
        os.close(fd)

    os.sync()
    for i in range(n):  # who goes first alternates: neither always pays the other's writeback
        arrays = slots.gather(src[i], 0)
        t("xxh3_of_chunk", lambda: xxhash.xxh3_64(src[i]).intdigest())
        t("gather_views", lambda: slots.gather(src[i], 0))
        pair = [("raw_write_tmp_rename", lambda: raw_write(i)),
                ("hybridkv_store_write", lambda: store.write(
                    keys[i], position=0, block_offset=0, arrays=arrays))]
        for name, fn in (pair if i % 2 == 0 else pair[::-1]):
            t(name, fn)
    for i in range(n):
        pair = [("raw_readv_into_slot", lambda: raw_read(i)),
                ("hybridkv_read_into_verified", lambda: store.read_into(keys[i], buf))]
        for name, fn in (pair if i % 2 == 0 else pair[::-1]):
            t(name, fn)
        _, arrays = store.read_into(keys[i], buf)
        t("scatter_copy_into_slot", lambda: slots.scatter(row, 0, arrays))
        if not np.array_equal(row, src[i]):
            raise AssertionError("stage check: other bytes")
    shutil.rmtree(raw_dir, ignore_errors=True)
    for k in keys:
        store.delete(k)
    return {"chunk_bytes": int(src.shape[1]), "best_ms": {k: round(v * 1e3, 3)
                                                         for k, v in best.items()}}


def bench_job_stages(rig, kib: int, n: int, per_job: int, chunk_tokens: int, src) -> dict:
    """One extra round of hybridkv alone, its ``JobRunner`` steps timed (not counted in
    the ratios): the control thread's plan and commit (of which the statistics file's
    flush) against the I/O threads' reads and writes, summed over the round's jobs."""
    runner = rig.tier.runner
    counters = runner.service.counters
    spent: dict[str, list[float]] = {}

    def timed(owner, name, label):
        fn = getattr(owner, name)

        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent.setdefault(label, []).append(time.perf_counter() - t0)
        setattr(owner, name, wrapper)

    steps = [(runner, "_plan_store", "control_plan_store"),
             (runner, "_write_all", "io_write_chunks"),
             (runner, "_commit_store", "control_commit_store"),
             (runner, "_read_all", "io_read_verify_fill"),
             (runner, "_commit_load", "control_commit_load"),
             (counters, "flush", "control_stats_file_flush")]
    steps = [(o, n, lbl) for o, n, lbl in steps if hasattr(o, n)]  # diagnostic: tolerate renames
    for owner, name, label in steps:
        timed(owner, name, label)
    try:
        keys = make_keys(f"jobstage-{kib}", n)
        rig.rows[:n] = src
        _sync_and_settle()
        store = run_jobs(rig.tier, make_jobs(keys, list(range(n)), per_job, chunk_tokens,
                                             f"js{kib}", False), load=False)
        jobs = make_jobs(keys, list(range(n)), per_job, chunk_tokens, f"jl{kib}", True)
        for job in jobs:
            resolve_lookups(rig.tier, job.keys, job.req_context)
        flush_before_load = len(spent.get("control_stats_file_flush", []))
        load = run_jobs(rig.tier, jobs, load=True)
    finally:
        for owner, name, _ in steps:
            owner.__dict__.pop(name, None)
    flushes = spent.get("control_stats_file_flush", [])
    out = {"jobs": len(jobs), "keys_per_job": per_job, "steps_timed": [lbl for _, _, lbl in steps],
           "store_round_ms": round(store["seconds"] * 1e3, 2),
           "load_round_ms": round(load["seconds"] * 1e3, 2),
           "stats_flushes_in_stores": flush_before_load,
           "stats_flushes_in_loads": len(flushes) - flush_before_load}
    for label, v in spent.items():
        out[f"{label}_sum_ms"] = round(sum(v) * 1e3, 2)
        out[f"{label}_median_ms"] = round(statistics.median(v) * 1e3, 3)
    out["stats_file_flush_in_stores_sum_ms"] = round(sum(flushes[:flush_before_load]) * 1e3, 2)
    out["stats_file_flush_in_loads_sum_ms"] = round(sum(flushes[flush_before_load:]) * 1e3, 2)
    return out


# ---------------------------------------------------------------- 2./3. disk and restart
def dir_usage(path: Path, chunk_paths: set[str] | None = None) -> dict:
    files = size = blocks = 0
    c_files = c_size = c_blocks = 0
    for dirpath, _, names in os.walk(path):
        for name in names:
            p = os.path.join(dirpath, name)
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            if not os.path.isfile(p) or os.path.islink(p):
                continue
            files += 1
            size += st.st_size
            blocks += st.st_blocks * 512
            if chunk_paths is not None and p in chunk_paths:
                c_files += 1
                c_size += st.st_size
                c_blocks += st.st_blocks * 512
    return {"files": files, "bytes": size, "block_bytes": blocks, "chunk_files": c_files,
            "chunk_bytes": c_size, "chunk_block_bytes": c_blocks}


def bench_disk(work: Path, model: Path, name: str, threads: int, requests: int,
               tiny: bool) -> dict:
    from hybridkv.keys import key_group
    build, bpc, n_chunks, tiny_name = DISK_LAYOUTS[name]
    layout = tiny_name if tiny else build()
    if tiny:
        bpc = 1
    tag = f"d-{name}{'-tiny' if tiny else ''}"
    pair = Pair(work, model, tag, layout, threads, cpu_bytes=96 << 20, num_blocks=400,
                blocks_per_chunk=bpc)
    result: dict = {"layout": name, "tiny_harness_layout": tiny}
    reqs = []
    try:
        hk = pair.rigs["hybridkv"]
        result["slot_bytes"] = int(hk.rows.shape[1])
        result["group_bytes"] = {g: hk.tier.slots.group_bytes(g) for g in hk.group_ids}
        result["group_kinds"] = {g.index: g.kind.value for g in hk.tier.layout.groups}
        result["chunk_tokens"] = dict(hk.chunk_tokens)
        tokens = 0
        offered = 0
        request_tokens = n_chunks * max(hk.chunk_tokens.values())
        prompt_tokens = request_tokens + 7  # its last, partial chunk is not stored
        for r in range(requests):
            reqs.append((f"{tag}-r{r}", r))
            tokens += request_tokens
        paths: dict[str, set[str]] = {"fs": set(), "hybridkv": set()}
        stored: dict[str, list[bytes]] = {"fs": [], "hybridkv": []}
        for who, rig in pair.rigs.items():
            for rid, seed in reqs:
                ctx, keys = rig.request(rid, n_chunks, seed=1000 + seed)
                offered += len(keys) if who == "fs" else 0
                if who == "hybridkv":  # what HybridKVConnector tells the tier first
                    rig.tier.note_prompt_tokens(rid, prompt_tokens)
                rig.store(ctx, keys)
                for k in keys:
                    p = key_path(rig, who, k)
                    if os.path.exists(p):
                        paths[who].add(p)
                        stored[who].append(k)
        result["tokens"] = tokens
        result["prompt_tokens_per_request"] = prompt_tokens
        result["keys_offered"] = offered
        per_group = {}
        for who in ("fs", "hybridkv"):
            counts: dict[int, int] = {}
            for k in stored[who]:
                counts[key_group(k)] = counts.get(key_group(k), 0) + 1
            per_group[who] = counts
        result["chunks_stored_per_group"] = per_group
        declined = {g: per_group["fs"].get(g, 0) - per_group["hybridkv"].get(g, 0)
                    for g in hk.group_ids}
        result["hybridkv_declined_per_group"] = declined
        pair.close()
        pair = None
        usage = {who: dir_usage(pair_dir, paths[who]) for who, pair_dir in
                 ((w, work / f"{tag}-{'fs' if w == 'fs' else 'hkv'}") for w in ("fs", "hybridkv"))}
        result["usage"] = usage
        result["bytes_per_token"] = {who: {m: round(u[m] / tokens, 1) for m in (
            "bytes", "block_bytes", "chunk_bytes", "chunk_block_bytes")}
            for who, u in usage.items()}
        result["ratio_hybridkv_vs_fs"] = {m: round(usage["hybridkv"][m] / usage["fs"][m], 4)
                                          for m in ("bytes", "block_bytes", "chunk_bytes",
                                                    "chunk_block_bytes")}
        hk_payload = sum(result["group_bytes"][key_group(k)] for k in stored["hybridkv"])
        result["hybridkv_header_bytes_per_chunk"] = round(
            (usage["hybridkv"]["chunk_bytes"] - hk_payload) / max(1, len(stored["hybridkv"])), 1)
        if not tiny and name in HYBRID_TARGET_LAYOUTS:
            result["budgeted_hybridkv"] = budgeted_admission(
                work, model, tag, layout, threads, bpc, reqs, n_chunks, prompt_tokens,
                usage["hybridkv"]["chunk_bytes"] // 2, per_group["fs"])
        result["restart"] = restart_check(work, model, tag, layout, threads, bpc, reqs,
                                          n_chunks, stored)
    finally:
        if pair is not None:
            pair.close()
        for suffix in ("fs", "hkv", "fs-conn"):
            shutil.rmtree(work / f"{tag}-{suffix}", ignore_errors=True)
    return result


def budgeted_admission(work: Path, model: Path, tag: str, layout, threads: int, bpc: int,
                       reqs, n_chunks: int, prompt_tokens: int, budget: int,
                       offered_per_group: dict[int, int]) -> dict:
    """The same requests into hybridkv with ``disk_budget`` at half of what they need:
    which groups' chunks its group-aware admission and eviction keep."""
    from hybridkv.keys import key_group
    from tier_helpers import TierRig
    d = work / f"{tag}-hkv-budget"
    rig = TierRig(model, d, layout, io_threads=threads, io_mode="buffered",
                  disk_budget=budget, cpu_bytes=96 << 20, num_blocks=400,
                  blocks_per_chunk=bpc)
    kept: dict[int, int] = {}
    try:
        all_keys = []
        for rid, seed in reqs:
            ctx, keys = rig.request(f"{rid}-b", n_chunks, seed=1000 + seed)
            rig.tier.note_prompt_tokens(f"{rid}-b", prompt_tokens)
            rig.store(ctx, keys)
            all_keys += keys
        for k in all_keys:
            if os.path.exists(key_path(rig, "hybridkv", k)):
                kept[key_group(k)] = kept.get(key_group(k), 0) + 1
        counters = rig.tier.cache.counters.snapshot()
    finally:
        rig.close()
    usage = dir_usage(d)
    shutil.rmtree(d, ignore_errors=True)
    return {"disk_budget": budget, "bytes_on_disk": usage["bytes"],
            "chunks_offered_per_group": offered_per_group, "chunks_kept_per_group": kept,
            "stores_not_admitted": counters.get("all", {}).get("stores_not_admitted", 0),
            "stores_skipped_budget": counters.get("all", {}).get("stores_skipped_budget", 0)}


def restart_check(work: Path, model: Path, tag: str, layout, threads: int, bpc: int,
                  reqs, n_chunks: int, stored: dict[str, list[bytes]]) -> dict:
    """New rigs on the same directories: every stored key HIT, promoted, bytes identical."""
    pair = Pair(work, model, tag, layout, threads, cpu_bytes=96 << 20, num_blocks=400,
                blocks_per_chunk=bpc)
    out = {}
    try:
        for who, rig in pair.rigs.items():
            want = set(stored[who])
            promoted = mismatched = missing = 0
            for rid, seed in reqs:
                ctx, keys = rig.request(f"{rid}-again", n_chunks, seed=1000 + seed)
                keys = [k for k in keys if k in want]
                if not keys:
                    continue
                from vllm.v1.kv_offload.base import LookupResult
                results = rig.lookup(ctx, keys, timeout=120)
                for k in keys:
                    if results[k] != LookupResult.HIT:
                        missing += 1
                        continue
                    got = rig.loaded_bytes(ctx, k)
                    promoted += 1
                    mismatched += got != rig.group_bytes(k, rig.expected(k))
                rig.manager.on_request_finished(ctx)
                rig.settle()
            out[who] = {"stored": len(want), "promoted": promoted, "mismatched": mismatched,
                        "missing_after_restart": missing}
    finally:
        pair.close()
    return out


# ---------------------------------------------------------------- targets and report
WHY = {
    "store": "per chunk hybridkv hashes every byte (xxh3) and writes a header + a temp file + "
             "rename from Python I/O threads; per job its one control thread runs the "
             "admission, then store_done (a stat and header read per key; see "
             "hybridkv_job_stages); vLLM's fs tier loops over the job's blocks in C with the "
             "GIL released and checks nothing; large buffered writes swing with writeback on "
             "a shared box",
    "load": "hybridkv reads each chunk into a per-thread buffer, verifies header and xxh3, "
            "then copies the payload into the CPU slot (a second memcpy: no unverified byte "
            "ever lands in a slot), per chunk in Python under the GIL (see "
            "hybridkv_stages_1_thread, hybridkv_job_stages); vLLM's fs tier readv()s "
            "straight into the slot in C, unverified",
    "disk": "where the slot has no padding (sliding + full: every group fills the slot) and "
            "nothing is declined (no disk_budget: spare chunks are stored), hybridkv's file "
            "is the slot plus its header (~0.6 KiB), which also costs one more 4 KiB block "
            "per file, and its index snapshot and statistics files add a few more",
    "restart": "a promoted slot differed from what was stored, or a stored key was not "
               "found after the restart",
}


def _worst(cells: dict[str, float], goal: float, why: str, higher_is_better=True) -> dict:
    worst_cell = (min if higher_is_better else max)(cells, key=cells.get)
    fig = cells[worst_cell]
    met = fig >= goal if higher_is_better else fig <= goal
    t = {"figure": round(fig, 3), "goal": f"{'>=' if higher_is_better else '<='} {goal}",
         "met": bool(met), "worst_cell": worst_cell, "cells": cells}
    if not met:
        t["reason"] = why
    return t


def targets_of(sizes: list[dict], disk: list[dict]) -> dict:
    t: dict[str, dict] = {}
    big = [s for s in sizes if s["chunk_bytes"] >= BIG]
    if big:
        t["tier_store_vs_fs"] = _worst(
            {f"{s['chunk_bytes'] >> 10}KiB": s["ratio_hybridkv_vs_fs_median"]["store"]
             for s in big}, 1.0, WHY["store"])
        t["tier_promote_vs_fs"] = _worst(
            {f"{s['chunk_bytes'] >> 10}KiB_{phase}":
             s["ratio_hybridkv_vs_fs_median"][f"load_{phase}"]
             for s in big for phase in ("warm", "cold")}, 1.0, WHY["load"])
    else:
        for name in ("tier_store_vs_fs", "tier_promote_vs_fs"):
            t[name] = {"figure": 0.0, "goal": ">= 1.0", "met": False,
                       "reason": "no chunk size >= 1 MiB was measured (--sizes)"}
    mism = sum(d["restart"]["hybridkv"]["mismatched"]
               + d["restart"]["hybridkv"]["missing_after_restart"] for d in disk)
    promoted = sum(d["restart"]["hybridkv"]["promoted"] for d in disk)
    t["restart_promotion_identical"] = {
        "figure": mism, "goal": "== 0", "met": mism == 0 and promoted > 0,
        "promoted": promoted, "layouts": [
            f"{d['layout']}{' (tiny)' if d['tiny_harness_layout'] else ''}" for d in disk]}
    if not t["restart_promotion_identical"]["met"]:
        t["restart_promotion_identical"]["reason"] = (
            WHY["restart"] if promoted else "nothing was promoted after the restart")
    cells = {f"{d['layout']}_{m}": d["ratio_hybridkv_vs_fs"][m]
             for d in disk if d["layout"] in HYBRID_TARGET_LAYOUTS and not d["tiny_harness_layout"]
             for m in ("bytes", "block_bytes")}
    t["disk_bytes_per_token"] = _worst(cells, 1.0, WHY["disk"], higher_is_better=False)
    return t


def machine_notes() -> list[str]:
    try:
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load = "?"
    return [f"{os.cpu_count()} CPUs, shared with other work and noisy (load average {load}): "
            "the tiers take turns round by round (A B, B A, ...) and the figures are "
            "medians of per-round ratios; compare ratios, not GB/s"]


def main(argv: list[str] | None = None) -> int:
    ap = _Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--quick", action="store_true",
                    help="chunk sizes 64 KiB, 1 MiB, 4 MiB; 2 rounds; less data")
    ap.add_argument("--dir", default=None, help="filesystem to test (default: system temp)")
    ap.add_argument("--threads", default="4", help="I/O threads of each tier (default 4)")
    ap.add_argument("--rounds", default=None, help="alternating rounds (default 3; quick 2)")
    ap.add_argument("--sizes", default=None,
                    help="chunk sizes in KiB, multiples of 64 up to 16384 (default "
                         f"{','.join(map(str, FULL_SIZES))}; quick "
                         f"{','.join(map(str, QUICK_SIZES))})")
    ap.add_argument("--mib-per-round", default=None,
                    help="MiB each tier moves per round and size (default 64; quick 24)")
    args = ap.parse_args(argv)

    def integer(name: str, value: str, lo: int, hi: int) -> int | None:
        try:
            v = int(value)
        except ValueError:
            return None
        return v if lo <= v <= hi else None

    threads = integer("--threads", args.threads, 1, 64)
    if threads is None:
        return _fail(f"--threads must be an integer in 1..64 (got {args.threads!r})")
    rounds_s = args.rounds if args.rounds is not None else ("2" if args.quick else "3")
    rounds = integer("--rounds", rounds_s, 1, 100)
    if rounds is None:
        return _fail(f"--rounds must be an integer in 1..100 (got {rounds_s!r})")
    mib_s = args.mib_per_round or ("24" if args.quick else "64")
    mib = integer("--mib-per-round", mib_s, 1, 4096)
    if mib is None:
        return _fail(f"--mib-per-round must be an integer in 1..4096 (got {mib_s!r})")
    if args.sizes is None:
        sizes = list(QUICK_SIZES if args.quick else FULL_SIZES)
    else:
        try:
            sizes = [int(s) for s in args.sizes.split(",")]
        except ValueError:
            sizes = []
        if not sizes or any(s < 64 or s % 64 or s > MAX_KIB for s in sizes):
            return _fail(f"--sizes {args.sizes!r}: expected chunk sizes in KiB, multiples "
                         f"of 64 up to {MAX_KIB}, comma-separated")
    out = Path(args.out)
    if not out.parent.is_dir():
        return _fail(f"--out {args.out}: directory {out.parent} does not exist")
    if args.dir is not None and not Path(args.dir).is_dir():
        return _fail(f"--dir {args.dir}: not a directory")

    started = time.perf_counter()
    notes = machine_notes()
    work = Path(tempfile.mkdtemp(prefix="hybridkv-tier-io-", dir=args.dir))
    try:
        return run(args, work, out, sizes, threads, rounds, mib, notes, started)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def print_size(s: dict) -> None:
    """The table row of one chunk size, and hybridkv's stage hints under it."""
    g, x, lat = s["GBps_median"], s["ratio_hybridkv_vs_fs_median"], s["per_key_latency"]

    def pair(a: str, b: str, width: int) -> str:
        return f"{g[a]:>{width}.2f} /{g[b]:>{width}.2f}"
    print(f"{s['chunk_bytes'] >> 10:>6}KiB {s['keys_per_round']:>5} | "
          f"{pair('hybridkv_store', 'fs_store', 8)} {x['store']:>5.2f} | "
          f"{pair('hybridkv_load_warm', 'fs_load_warm', 6)}  {x['load_warm']:>5.2f} | "
          f"{pair('hybridkv_load_cold', 'fs_load_cold', 6)}  {x['load_cold']:>5.2f} | "
          f"{lat['hybridkv_store_median_ms']:>9.2f} /{lat['fs_store_median_ms']:>9.2f}  | "
          f"{lat['hybridkv_load_warm_median_ms']:>7.2f} /{lat['fs_load_warm_median_ms']:>7.2f}",
          flush=True)
    if s["hybridkv_stages_1_thread"]:
        st = s["hybridkv_stages_1_thread"]["best_ms"]
        print(f"{'':>16}1 thread, ms: store: raw write {st['raw_write_tmp_rename']:.2f}, "
              f"xxh3 {st['xxh3_of_chunk']:.2f}, hybridkv write {st['hybridkv_store_write']:.2f}"
              f" | load: raw readv {st['raw_readv_into_slot']:.2f}, hybridkv read+verify "
              f"{st['hybridkv_read_into_verified']:.2f} + copy into slot "
              f"{st['scatter_copy_into_slot']:.2f}", flush=True)
    js = s["hybridkv_job_stages"]
    if js:
        control = js.get("control_plan_store_sum_ms", 0) + js.get("control_commit_store_sum_ms", 0)
        print(f"{'':>16}hybridkv job steps, {js['jobs']} jobs, summed ms: store: control "
              f"{control:.1f} (stats file {js['stats_file_flush_in_stores_sum_ms']:.1f}), io "
              f"{js.get('io_write_chunks_sum_ms', 0):.1f}, round {js['store_round_ms']:.1f} | "
              f"load: io {js.get('io_read_verify_fill_sum_ms', 0):.1f}, control "
              f"{js.get('control_commit_load_sum_ms', 0):.1f} (stats file "
              f"{js['stats_file_flush_in_loads_sum_ms']:.1f}), round {js['load_round_ms']:.1f}",
              flush=True)


def run(args, work: Path, out: Path, sizes, threads, rounds, mib, notes, started) -> int:
    import harness as H
    from pagecache import drop_page_cache
    from report import print_targets, save
    from vllm.v1.kv_offload.tiering.fs import io as fs_io

    model = H.write_tiny_model(work / "model")
    notes.append(f"vLLM fs tier: {'C routines (vllm.fs_io_C)' if fs_io._HAS_FSIO_C else 'Python'}"
                 f"; O_DIRECT off (buffered, as hybridkv io_mode='buffered'); n_read_threads = "
                 f"n_write_threads = {threads} (its two queues share both thread sets: up to "
                 f"{2 * threads} threads), hybridkv io_threads = {threads} + 1 control thread")
    notes.append("hybridkv: durability 'none' (the default; vLLM's fs tier does not fsync "
                 "either), verification on (header + xxh3 on every load), no integrity key")
    cold_check = _cold_works(work, drop_page_cache)
    notes.append(f"page cache drop (posix_fadvise DONTNEED): {cold_check}")
    for n in notes:
        print(f"note: {n}", flush=True)

    lat_keys = 6 if args.quick else 16
    results = []
    print(f"{'chunk':>9} {'keys':>5} | {'store GB/s hkv/fs':>19} {'x':>5} | "
          f"{'warm load GB/s':>16} {'x':>5} | {'cold load GB/s':>16} {'x':>5} | "
          f"{'1-key store ms hkv/fs':>22} | {'1-key warm load ms':>19}", flush=True)
    for kib in sizes:
        s = bench_size(work, model, kib, threads, rounds, mib << 20, lat_keys, drop_page_cache)
        results.append(s)
        print_size(s)

    disk = []
    requests = 2 if args.quick else 4
    print(f"{'layout':>12} | {'slot':>8} | {'bytes/token fs':>15} {'hkv':>9} {'x':>6} | "
          f"{'blocks/token fs':>15} {'hkv':>9} {'x':>6} | chunks stored fs/hkv | restart "
          f"promoted / mismatched", flush=True)
    for name in DISK_LAYOUTS:
        for tiny in (False, True):
            d = bench_disk(work, model, name, threads, requests, tiny)
            disk.append(d)
            b, x = d["bytes_per_token"], d["ratio_hybridkv_vs_fs"]
            cs = d["chunks_stored_per_group"]
            rs = d["restart"]["hybridkv"]
            print(f"{name + (' tiny' if tiny else ''):>12} | {d['slot_bytes'] >> 10:>5}KiB | "
                  f"{b['fs']['bytes']:>15.0f} {b['hybridkv']['bytes']:>9.0f} {x['bytes']:>6.3f} | "
                  f"{b['fs']['block_bytes']:>15.0f} {b['hybridkv']['block_bytes']:>9.0f} "
                  f"{x['block_bytes']:>6.3f} | {sum(cs['fs'].values()):>9} / "
                  f"{sum(cs['hybridkv'].values()):<8} | {rs['promoted']} / "
                  f"{rs['mismatched'] + rs['missing_after_restart']}", flush=True)
            declined = {g: n for g, n in d["hybridkv_declined_per_group"].items() if n}
            kinds = d["group_kinds"]
            if declined:
                print(f"{'':>15}hybridkv's group-aware admission declined (group: chunks) "
                      + ", ".join(f"{g} ({kinds[g]}): {n}" for g, n in declined.items()),
                      flush=True)
            b = d.get("budgeted_hybridkv")
            if b:
                print(f"{'':>15}hybridkv with disk_budget {b['disk_budget'] >> 10} KiB (half "
                      "of the need) keeps per group: " + ", ".join(
                          f"{g} ({kinds[g]}) {b['chunks_kept_per_group'].get(g, 0)}/{n}"
                          for g, n in b["chunks_offered_per_group"].items()), flush=True)

    notes.append(f"load average at end {Path('/proc/loadavg').read_text().split()[0]}")
    targets = targets_of(results, disk)
    print_targets(targets)
    for name, t in targets.items():
        if "reason" in t:
            print(f"  {name} missed: {t['reason']}")
    admission = {f"{d['layout']}{'_tiny' if d['tiny_harness_layout'] else ''}":
                 {"declined_per_group_unbounded": d["hybridkv_declined_per_group"],
                  "group_kinds": d["group_kinds"],
                  "budgeted": d.get("budgeted_hybridkv")} for d in disk}
    admission["note"] = (
        "without a disk_budget hybridkv's group-aware admission rejects only chunks no hit "
        "point can ever use; sliding-window chunks outside the request end's window and "
        "states between resume points are SPARE and are stored while there is room, so "
        "the unbounded runs decline nothing (bytes/token there differ only by the slot's "
        "padding and hybridkv's header); under a budget ('budgeted') spare chunks give way "
        "first")
    save(out, "tier_io", quick=args.quick, started=started,
         dir=str(args.dir or tempfile.gettempdir()), threads=threads, rounds=rounds,
         mib_per_round=mib, notes=notes, cold_reads=cold_check, throughput=results,
         disk=disk, group_aware_admission=admission, targets=targets)
    return 0


def _cold_works(work: Path, drop) -> str:
    """Whether a dropped file is really read from the disk again (``fincore`` if present)."""
    p = work / "cold-probe.bin"
    p.write_bytes(os.urandom(4 << 20))
    drop([p])
    fincore = shutil.which("fincore")
    if fincore is None:
        return "dropped; not verified (no fincore)"
    import subprocess
    try:
        res = subprocess.run([fincore, "--bytes", "--noheadings", "--output", "RES", str(p)],
                             capture_output=True, text=True, timeout=10)
        resident = int(res.stdout.split()[0])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return "dropped; fincore could not tell"
    finally:
        p.unlink(missing_ok=True)
    return ("works (fincore: 0 bytes resident after the drop)" if resident == 0 else
            f"ineffective here ({resident} bytes still resident): cold figures are warm")


if __name__ == "__main__":
    sys.exit(main())
