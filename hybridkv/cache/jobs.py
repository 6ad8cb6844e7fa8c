"""``JobRunner``: a ``CacheService`` behind threads, for callers that must never block.

For adapters whose calls run on an engine's scheduler thread and must not wait for
a disk (vLLM's secondary tiers run there). Every service call that may touch the
disk runs on ONE control thread, in submission order; chunk reads and writes run on
a bounded pool of I/O threads, one task per job; results come back through
``finished``.

Invariants:
- The caller's thread does no file I/O and never waits: ``lookup`` answers from
  memory (``CacheService.lookup_cached``: under a non-blocking acquire of ``lock``, or,
  while the control thread holds it, as a read that tolerates a concurrent writer and
  counts nothing), or None ("ask again") while a disk check of the key runs on the
  control thread; ``stats`` is None while the service is busy; the rest is queued.
- The service is used by one thread at a time (under ``lock``); I/O threads only
  read and write chunk files through ``store`` and never touch the service.
- Every submitted job is reported exactly once by ``finished``, also when a step
  of it raised (then as failed). A job is reported as soon as its I/O is done; the
  service learns of it afterwards, on the control thread (``pending`` and ``drain``
  wait for that too).
- A load hands to ``fill`` only chunks that passed the store's verification (header,
  checksum, integrity tag); a key that failed is reported failed, ``fill`` never sees
  it, and ``lookup`` answers False for it from the report on. A store job reads its keys (``read``) only before it is reported: the
  caller keeps that memory valid until then.
- At most ``max_store_jobs`` store jobs wait or run at a time; a store job beyond
  that is reported done at once with nothing stored (``stores_dropped_busy``):
  a busy disk sheds stores instead of queueing without bound.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import msgspec
import numpy as np

from hybridkv.cache.service import CacheService
from hybridkv.keys import key_group
from hybridkv.store.direct import aligned_empty
from hybridkv.store.failures import NO_SPACE, Warnings, failure_cause
from hybridkv.store.format import ChunkError, ChunkHeader

__all__ = ["JobRunner", "JobOutcome", "ReadChunk", "FillChunk"]

log = logging.getLogger(__name__)

#: a store job's bytes of one key: uint8[num_blocks, page_bytes] per layer of its group
ReadChunk = Callable[[bytes], Sequence[np.ndarray]]
#: a load's verified chunk -> the caller's memory (raises ValueError if it cannot fit)
FillChunk = Callable[[bytes, ChunkHeader, list[np.ndarray]], None]

#: answers of disk checks kept for the caller before the table starts over
_MAX_RESOLVED = 100_000


class JobOutcome(msgspec.Struct, kw_only=True):
    job_id: int
    is_load: bool
    #: keys loaded (loads), or stored or already on disk (stores)
    done: list[bytes]
    #: keys whose chunk could not be loaded or written
    failed: list[bytes]
    nbytes: int
    seconds: float
    #: False when a step of the job raised: nothing of it may be trusted
    ok: bool = True


class JobRunner:
    def __init__(self, service: CacheService, *, io_threads: int = 4,
                 max_store_jobs: int = 64, tick_interval: float = 0.5):
        self.service = service
        self.store = service.store
        self.lock = threading.Lock()
        self.max_store_jobs = max_store_jobs
        self.tick_interval = tick_interval
        self._control = ThreadPoolExecutor(1, thread_name_prefix="hybridkv-control")
        self._io = ThreadPoolExecutor(max(1, io_threads), thread_name_prefix="hybridkv-io")
        self._buffers = threading.local()
        self._finished: collections.deque[JobOutcome] = collections.deque()
        self._resolved: dict[bytes, bool] = {}  # key -> what a disk check answered
        self._checking: set[bytes] = set()  # keys a disk check runs for
        self._failed_loads: set[bytes] = set()  # failed loads reported, service not yet told
        self._jobs = 0  # submitted, not yet reported
        self._store_jobs = 0
        self._idle = threading.Condition()
        self._last_tick = 0.0
        self._closed = False
        #: lookups answered while the control thread held the service (not counted there)
        self.busy_lookups = 0
        self._warnings = Warnings(log)  # one warning per cause per minute

    # ------------------------------------------------------------------ caller's thread
    def lookup(self, key: bytes) -> bool | None:
        """Is ``key`` there to load? None: not known yet, ask again (a disk check runs)."""
        answer = self._resolved.pop(key, None)
        if answer is not None:
            return answer
        if key in self._failed_loads:  # reported failed, not yet dropped by the service
            return False
        if key in self._checking:
            return None
        if self.lock.acquire(blocking=False):
            try:
                cached = self.service.lookup_cached(key)
            finally:
                self.lock.release()
        else:  # the control thread works: a stale answer is a lost hit or a failed load
            self.busy_lookups += 1
            cached = self.service.lookup_cached(key, count=False)
        if cached is None:
            self._checking.add(key)
            self._control.submit(self._check, key)
        return cached

    def submit_store(self, job_id: int, keys: Collection[bytes], positions: Mapping[bytes, int],
                     request_id: str, read: ReadChunk) -> None:
        """Store what the service admits of ``keys``; ``positions``: every key of the
        request -> its chunk's first token (the service's ``plan_stores``)."""
        started = time.perf_counter()
        self._begin(store=True)
        if self._store_jobs > self.max_store_jobs:
            self.service.counters.add("stores_dropped_busy", len(keys))
            self._report(JobOutcome(job_id=job_id, is_load=False, done=[], failed=[],
                                    nbytes=0, seconds=0.0), store=True)
            return
        self._control.submit(self._guard, job_id, False, started, self._plan_store,
                             job_id, list(keys), dict(positions), request_id, read, started)

    def submit_load(self, job_id: int, keys: Collection[bytes], fill: FillChunk) -> None:
        """Read, verify and ``fill`` each of ``keys``; report which loaded."""
        started = time.perf_counter()
        self._begin(store=False)
        self._io.submit(self._guard, job_id, True, started, self._read_all,
                        job_id, list(keys), fill, started)

    def finished(self) -> list[JobOutcome]:
        """Jobs reported since the last call."""
        out = []
        while self._finished:
            out.append(self._finished.popleft())
        return out

    def touch(self, keys: Collection[bytes]) -> None:
        self._queue(self.service.touch, list(keys))

    def note_prompt_tokens(self, request_id: str, num_tokens: int) -> None:
        self._queue(self.service.note_prompt_tokens, request_id, num_tokens)

    def request_finished(self, request_id: str) -> None:
        self._queue(self.service.request_finished, request_id)

    def tick(self) -> None:
        """Queue the service's periodic work (fleet heartbeat, snapshot), at most once per
        ``tick_interval``."""
        now = time.monotonic()
        if now - self._last_tick >= self.tick_interval:
            self._last_tick = now
            self._queue(self.service.tick)

    def stats(self, read: Callable[[CacheService], object]) -> object | None:
        """``read(service)`` if the service is free now, else None (try the next step)."""
        if not self.lock.acquire(blocking=False):
            return None
        try:
            return read(self.service)
        finally:
            self.lock.release()

    def pending(self) -> bool:
        return self._jobs > 0

    def drain(self) -> None:
        """Block until every submitted job is reported."""
        with self._idle:
            self._idle.wait_for(lambda: self._jobs == 0)

    def close(self) -> None:
        """Finish the jobs, close the service (snapshot, fleet, counters), stop threads."""
        if self._closed:
            return
        self._closed = True
        self.drain()
        self._control.submit(self._locked, self.service.close).result()
        self._control.shutdown(wait=True)
        self._io.shutdown(wait=True)

    # ------------------------------------------------------------------ control thread
    def _check(self, key: bytes) -> None:
        try:
            with self.lock:
                answer = self.service.lookup(key)
        except Exception:  # a check that cannot tell is a miss
            log.exception("hybridkv: lookup of %s failed", key.hex()[:16])
            answer = False
        if len(self._resolved) > _MAX_RESOLVED:
            self._resolved.clear()
        self._resolved[key] = answer
        self._checking.discard(key)

    def _plan_store(self, job_id, keys, positions, request_id, read, started) -> None:
        with self.lock:
            plan = self.service.plan_stores(keys, positions, request_id)
        admitted = [(c.key, c.position, c.parent) for c in plan.admitted]
        if not admitted:
            self._report(JobOutcome(job_id=job_id, is_load=False, done=[], failed=[],
                                    nbytes=0, seconds=time.perf_counter() - started),
                         store=True)
            return
        self._io.submit(self._guard, job_id, False, started, self._write_all,
                        job_id, admitted, read, started)

    def _commit_store(self, done, failed) -> None:
        with self.lock:
            service = self.service
            service.store_done(done + [k for k, _ in failed])
            for key, cause in failed:
                service.counters.add("store_failures", 1, key_group(key))
                service.counters.add(f"store_failures_{cause}", 1, key_group(key))
            no_space = sum(cause == NO_SPACE for _, cause in failed)
            if no_space:  # evict a bounded round, back off while the filesystem stays full
                service.store_failed_no_space(no_space)

    def _commit_load(self, done, failed, nbytes) -> None:
        with self.lock:
            service = self.service
            service.load_started(done + [k for k, _ in failed])
            service.load_done(done + [k for k, _ in failed])  # drops what failed verification
            for key, reason in failed:
                service.counters.add("load_failures", 1, key_group(key))
                service.counters.add(f"load_failures_{reason}", 1, key_group(key))
            for key in done:
                service.counters.add("chunks_loaded", 1, key_group(key))
            if done:
                service.counters.add("bytes_read", nbytes)
        self._failed_loads.difference_update(k for k, _ in failed)

    def _locked(self, fn, *args) -> None:
        with self.lock:
            fn(*args)

    # ------------------------------------------------------------------ I/O threads
    def _write_all(self, job_id, admitted, read, started) -> None:
        done: list[bytes] = []
        failed: list[tuple[bytes, str]] = []
        nbytes = 0
        for key, position, parent in admitted:
            try:
                nbytes += self.store.write(key, position=position, block_offset=0,
                                           arrays=read(key), parent=parent)
                done.append(key)
            except Exception as exc:  # the chunk stays unstored; nothing half-visible
                cause = failure_cause(exc)
                self._warnings.warn(cause, "hybridkv: store of chunk %s failed (%s): %s",
                                    key.hex()[:16], cause, exc)
                failed.append((key, cause))
        self._finished.append(JobOutcome(job_id=job_id, is_load=False, done=done,
                                         failed=[k for k, _ in failed], nbytes=nbytes,
                                         seconds=time.perf_counter() - started))
        self._control.submit(self._settle, True, self._commit_store, done, failed)

    def _read_all(self, job_id, keys, fill, started) -> None:
        done: list[bytes] = []
        failed: list[tuple[bytes, str]] = []
        nbytes = 0
        for key in keys:
            try:
                header, arrays = self.store.read_into(key, self._buffer(key))
                fill(key, header, arrays)
            except (ChunkError, OSError, ValueError) as exc:
                reason = type(exc).__name__
                log.warning("hybridkv: load of chunk %s failed (%s): %s; the engine will "
                            "recompute it", key.hex()[:16], reason, exc)
                failed.append((key, reason))
                continue
            done.append(key)
            nbytes += sum(a.nbytes for a in arrays)
        self._failed_loads.update(k for k, _ in failed)  # no HIT for them from now on
        self._finished.append(JobOutcome(job_id=job_id, is_load=True, done=done,
                                         failed=[k for k, _ in failed], nbytes=nbytes,
                                         seconds=time.perf_counter() - started))
        self._control.submit(self._settle, False, self._commit_load, done, failed, nbytes)

    def _buffer(self, key: bytes):
        """This thread's read buffer, large enough for any chunk of ``key``'s group."""
        need = self.store.max_file_bytes(key_group(key))
        buf = getattr(self._buffers, "buf", None)
        if buf is None or len(buf) < need:
            buf = self._buffers.buf = aligned_empty(need)
        return buf

    # ------------------------------------------------------------------ bookkeeping
    def _queue(self, fn, *args) -> None:
        if not self._closed:
            self._control.submit(self._guard, None, False, 0.0, self._locked, fn, *args)

    def _settle(self, store: bool, fn, *args) -> None:
        """The service's part of a job already reported; then the job is done."""
        try:
            fn(*args)
        except Exception:
            log.exception("hybridkv: bookkeeping of a finished transfer failed")
        finally:
            self._end(store=store)

    def _guard(self, job_id, is_load, started, fn, *args) -> None:
        """Run one step of a job; a step that raised reports the job failed."""
        try:
            fn(*args)
        except Exception:
            log.exception("hybridkv: a transfer step failed")
            if job_id is not None:
                self._report(JobOutcome(job_id=job_id, is_load=is_load, done=[],
                                        failed=[], nbytes=0,
                                        seconds=time.perf_counter() - started),
                             store=not is_load, failed=True)

    def _begin(self, *, store: bool) -> None:
        with self._idle:
            self._jobs += 1
            self._store_jobs += store

    def _report(self, outcome: JobOutcome, *, store: bool, failed: bool = False) -> None:
        if failed:
            outcome.ok = False
        self._finished.append(outcome)
        self._end(store=store)

    def _end(self, *, store: bool) -> None:
        with self._idle:
            self._jobs -= 1
            self._store_jobs -= store
            self._idle.notify_all()
