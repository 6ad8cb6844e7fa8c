"""``CacheService``: one engine's cache of chunk files for one layout directory and rank.

The vLLM-free core every adapter drives (``hybridkv.vllm.manager`` today). It owns
the store, the index, ``Capacity`` and its policy, the index snapshot, the refresh
of other engines' files and the fleet budget, and speaks in chunk keys only.

Invariants:
- ``lookup`` / ``lookup_cached`` are ``Lookups``'s (their invariants are there).
- Keys passed to ``load_started`` are pinned until ``load_done``; eviction never
  removes a pinned key. A key whose load failed verification (its file was
  quarantined) leaves the index at ``load_done``.
- ``plan_stores`` never admits a key that is stored or being stored (dedup, also
  against another engine's file); admission, eviction and the budget are
  ``Capacity``'s (the code the simulator runs); with the fleet on, every admitted
  store also fits the fleet's budget. Every admitted store also fits above the
  filesystem's free-space floor as ``DiskFloor`` last measured it (its limit
  tightens the budget; only an engine that may evict, not a fleet member without
  the lease, evicts for it); while ``DiskFloor`` backs off nothing is admitted.
- Every key that leaves the index has its file deleted here (``drop``), is counted
  once by cause, and is reported once to ``on_change(keys, removed=True)``; every
  completed store is reported once to ``on_change(keys, removed=False)``.
- With ``hit_cost_rule`` on, ``hit_pays`` is False only where ``HitCost`` expects the
  load to be slower than recomputing (each refusal counted); off, it is always True.
- All time comes from ``clock`` (time-to-lives, snapshot intervals) and
  ``wall_clock`` (the fleet's leases and heartbeats, compared across hosts); the
  fleet's directory listings run on ``executor`` (a thread of its own by default).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Executor

from hybridkv.cache.disk_floor import DiskFloor
from hybridkv.cache.fleet_sync import FleetSync
from hybridkv.cache.lookups import Lookups
from hybridkv.cache.presence import Presence
from hybridkv.capacity import Capacity, StorePlan
from hybridkv.chunks import ChunkRecord
from hybridkv.config import HybridKVConfig
from hybridkv.hit_cost import HitCost
from hybridkv.index import ChunkIndex
from hybridkv.keys import key_group
from hybridkv.policies import Candidate, CapacityPolicy, LRUPolicy, RequestView
from hybridkv.stats import Counters
from hybridkv.store.chunk_store import ChunkStore
from hybridkv.store.format import ChunkError
from hybridkv.store.snapshot import SnapshotWriter, restore

__all__ = ["CacheService", "HEADER_ALLOWANCE", "OnChange"]

log = logging.getLogger(__name__)

#: bytes a chunk file adds on top of its payload (safetensors + JSON header), an upper bound
HEADER_ALLOWANCE = 4096

#: ``on_change(keys, removed)``: keys stored (False) or removed (True) on disk
OnChange = Callable[[list[bytes], bool], None]


class CacheService:
    def __init__(self, store: ChunkStore, config: HybridKVConfig, *,
                 policy: CapacityPolicy | None = None, counters: Counters | None = None,
                 on_change: OnChange | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time,
                 executor: Executor | None = None,
                 statvfs: Callable[[str], os.statvfs_result] = os.statvfs):
        self.store = store
        self.layout = store.layout
        self.config = config
        self.counters = counters or Counters(None, "manager")
        self.on_change = on_change
        self.clock = clock
        self.chunk_tokens = {g.index: g.chunk_tokens for g in self.layout.groups}
        self._prompt_tokens: dict[str, int] = {}  # request id -> prompt length
        #: what a hit costs against a recompute (``hit_cost_rule``; None: every hit pays)
        self.hit_cost = HitCost() if config.hit_cost_rule else None
        #: seconds each phase of the start took (``benchmarks/restart.py`` reports them)
        self.startup_seconds: dict[str, float] = {}
        started = time.perf_counter()
        self.index = ChunkIndex()
        self.presence = Presence(store, config.refresh_interval,
                                 stored_can_vanish=config.fleet_enabled, clock=clock)
        removed_tmp = self._restore_index()
        mark = time.perf_counter()
        self.capacity = Capacity(self.index, policy or LRUPolicy(), config.disk_budget,
                                 headroom=config.eviction_headroom)
        self.capacity.orphans = set()  # ``drop`` counts them as their own cause
        #: the free-space floor (``min_free_space``) and the no-space back-off
        self.disk_floor = DiskFloor(store.paths.layout_dir, config.min_free_space,
                                    clock=clock, statvfs=statvfs)
        self.startup_seconds["capacity"] = time.perf_counter() - mark
        self.counters.add("startup_chunks", len(self.index))
        self.counters.add("startup_tmp_removed", removed_tmp)
        log.info("hybridkv: %d chunks (%.1f MiB) found in %s in %.2fs; %d stale temp files "
                 "removed; eviction policy %s", len(self.index),
                 self.index.bytes_stored / 2**20, store.paths.layout_dir,
                 time.perf_counter() - started, removed_tmp, self.capacity.policy.name)
        mark = time.perf_counter()
        self.fleet: FleetSync | None = None
        if config.fleet_enabled:
            self.fleet = FleetSync(store, self.index, self.capacity, config, self.counters,
                                   self.drop, clock=wall_clock, executor=executor,
                                   floor_excess=self._floor_excess)
        self.lookups = Lookups(self.index, self.presence, self.counters, self.chunk_tokens,
                               forget=self._forget_gone,
                               tick=self.fleet.tick if self.fleet is not None else None)
        #: the hot path, bound once: ``Lookups.lookup`` / ``lookup_cached`` / ``fold``
        self.lookup = self.lookups.lookup
        self.lookup_cached = self.lookups.lookup_cached
        self.fold_lookups = self.lookups.fold
        self.drop(self.capacity.enforce())
        self.counters.flush(force=True)
        self.startup_seconds["fleet_enforce_flush"] = time.perf_counter() - mark
        self.startup_seconds["total"] = time.perf_counter() - started

    @property
    def policy(self) -> CapacityPolicy:
        return self.capacity.policy

    def _forget_gone(self, key: bytes, counter: str) -> None:
        """``key``'s file is gone: forget it, with its orphans (pinned keys stay), as
        after a failed load; count it under ``counter``."""
        self.drop(self.capacity.remove([key]), "gone")
        self.counters.add(counter, 1, key_group(key))

    # ------------------------------------------------------------------ hit cost
    def hit_pays(self, tokens: int) -> bool:
        """Report a servable hit of ``tokens`` tokens (True), or recompute them (False)?"""
        if self.hit_cost is None or self.hit_cost.pays(tokens):
            return True
        self.counters.add("hits_refused_cost", 1)
        self.counters.add("tokens_refused_cost", tokens)
        return False

    def observe_step(self, tokens: int, seconds: float) -> None:
        """The engine computed ``tokens`` tokens in one step of ``seconds``."""
        if self.hit_cost is not None:
            self.hit_cost.observe_step(tokens, seconds)

    def observe_load(self, tokens: int, seconds: float) -> None:
        """A hit of ``tokens`` tokens was ready ``seconds`` after it was scheduled."""
        if self.hit_cost is not None:
            self.hit_cost.observe_load(tokens, seconds)

    # ------------------------------------------------------------------ loads
    def load_started(self, keys: Collection[bytes]) -> None:
        """Pin ``keys`` for a load (they were just looked up)."""
        for key in keys:
            self.counters.add("chunks_load_prepared", 1, key_group(key))
        self.capacity.load(list(keys))

    def touch(self, keys: Collection[bytes]) -> None:
        for key in keys:
            self.index.touch(key)

    def load_done(self, keys: Collection[bytes]) -> None:
        """Unpin; forget keys whose load failed verification (their file is quarantined)."""
        keys = list(keys)
        self.capacity.load_done(keys)  # first: a dropped chunk's orphans may be among these keys
        for key in keys:
            if key in self.index and not self.store.exists(key):
                self.drop(self.capacity.remove([key]), "failed_verification")
                self.counters.add("chunks_dropped_after_failed_load", 1, key_group(key))
        self.fold_lookups()
        self.counters.flush()

    # ------------------------------------------------------------------ stores
    def plan_stores(self, keys: Collection[bytes], positions: Mapping[bytes, int],
                    request_id: str) -> StorePlan:
        """Which of ``keys`` to store now, in the caller's order (``plan.admitted``), and
        what was evicted for them (``plan.evicted``, files already deleted).

        ``positions``: every key of the request -> its chunk's first token position.
        """
        request = RequestView(request_id, positions, self.prompt_tokens(request_id))
        if self.fleet is not None:
            self.capacity.open_request(request)  # the fleet may evict now: not under it
            self.fleet.tick()
        by_position = {(key_group(k), p): k for k, p in positions.items()}
        batch: list[Candidate] = []
        for key in keys:
            if key in self.index or self.index.is_pending(key):
                continue
            if self.store.exists(key) and self.lookups.refresh(key, now_or_never=True):
                continue  # another engine stored it: dedup
            group = key_group(key)
            position = positions.get(key, 0)
            batch.append(Candidate(
                key, group, position, self.layout.group(group).chunk_bytes + HEADER_ALLOWANCE,
                by_position.get((group, position - self.chunk_tokens[group]))))
        floor = self.disk_floor
        limit = floor.limit(self.index.bytes_stored, self.index.bytes_used)
        if floor.backing_off() or floor.short:
            return self._skip_for_space(batch, limit, request)
        budget = self.config.disk_budget
        if limit is not None and (budget is None or limit < budget):
            budget, skip_cause = limit, "stores_skipped_floor"
        else:
            skip_cause = "stores_skipped_budget"
        if self.fleet is None or self.fleet.holder:  # who may evict, evicts for the floor too
            self.capacity.set_budget(budget)
        plan = self.capacity.offer(batch, request)
        if limit is not None:  # a fleet member without the lease did not evict for it
            self.disk_floor.trim(plan, self.capacity, limit)
        # delete first: the fleet's admission may sync, and a listing must not find (and
        # index again) the files of chunks just evicted
        self.drop(plan.evicted)
        if self.fleet is not None:
            self.fleet.admit(plan)
        for cand in plan.rejected:
            self.counters.add("stores_not_admitted", 1, cand.group)
        for cand in plan.skipped:
            self.counters.add(skip_cause, 1, cand.group)
        admitted = {c.key for c in plan.admitted}
        plan.admitted = [c for c in batch if c.key in admitted]  # the caller's order
        return plan

    def _skip_for_space(self, batch: list[Candidate], limit: int,
                        request: RequestView) -> StorePlan:
        """Below the floor: store nothing; evict a bounded round (not while backing off,
        only where this engine may evict, never the storing request's chunks)."""
        backing_off = self.disk_floor.backing_off()
        if not backing_off and (self.fleet is None or self.fleet.holder):
            self.capacity.open_request(request)
            self.capacity.set_budget(limit)
            self.drop(self.capacity.enforce())
        name = "stores_skipped_disk_full" if backing_off else "stores_skipped_floor"
        for cand in batch:
            self.counters.add(name, 1, cand.group)
        return StorePlan(skipped=batch)

    def _floor_excess(self) -> int:
        return self.disk_floor.excess(self.index.bytes_stored, self.index.bytes_used)

    def store_failed_no_space(self, count: int = 1) -> None:
        """``count`` stores failed with ENOSPC/EDQUOT (the worker's report): measure the
        free space now, evict a bounded round, back off if it stays full (``DiskFloor``)."""
        self.counters.add("stores_failed_no_space", count)
        self.disk_floor.no_space(self.index.bytes_stored, self.index.bytes_used)

    def store_done(self, keys: Collection[bytes]) -> list[ChunkRecord]:
        """Stores of ``keys`` ended (written or not): index what is complete on disk.

        Returns the records of the chunks stored; a store that left no usable file is
        counted as failed and its reservation released.
        """
        stored: list[ChunkRecord] = []
        evicted: list[bytes] = []
        for key in keys:
            if not self.index.is_pending(key):
                continue
            if self.fleet is not None:
                self.fleet.store_done(key)
            group = key_group(key)
            try:
                record = self.store.describe(key)
            except (OSError, ChunkError, ValueError):
                self.capacity.abort(key)
                self.counters.add("stores_failed", 1, group)
                continue
            evicted += self.capacity.commit(key, size=record.size, position=record.position,
                                            parent=record.parent, mtime_ns=record.mtime_ns)
            self.counters.add("chunks_stored", 1, group)
            self.counters.add("bytes_stored", record.size, group)
            stored.append(record)
        if stored and not self.store.layout_written:  # the disk was full at start
            self._write_layout_file()
        if stored and self.on_change is not None:
            self.on_change([r.key for r in stored], False)
        self.drop(evicted)
        self.fold_lookups()
        self.counters.flush()
        self.maintain()
        return stored

    def _write_layout_file(self) -> None:
        try:
            self.store.ensure_dirs()
        except (OSError, ChunkError) as exc:
            log.debug("hybridkv: layout.json not written yet: %s", exc)

    def note_prompt_tokens(self, request_id: str, num_tokens: int) -> None:
        """The prompt length of a request, before its stores (hit points of the policy)."""
        self._prompt_tokens[request_id] = num_tokens

    def prompt_tokens(self, request_id: str) -> int | None:
        """The prompt length told for an open request (None: not told, or finished)."""
        return self._prompt_tokens.get(request_id)

    def request_finished(self, request_id: str) -> None:
        self.capacity.request_finished(request_id)
        self._prompt_tokens.pop(request_id, None)

    # ------------------------------------------------------------------ removal
    def drop(self, keys: list[bytes], cause: str = "budget") -> None:
        """Delete the files of keys already removed from the index.

        ``cause`` (counted per group as ``chunks_evicted_<cause>``): budget, orphan (the
        capacity layer took the key along with another), failed_verification, gone, reset.
        """
        if self.fleet is not None:
            self.fleet.unlink(keys)
        else:
            for key in keys:
                self.store.delete(key)
        self.presence.forget(keys)
        orphans = self.capacity.orphans
        for key in keys:
            group = key_group(key)
            self.counters.add("chunks_evicted", 1, group)
            self.counters.add(f"chunks_evicted_{'orphan' if key in orphans else cause}",
                              1, group)
        orphans.clear()
        if keys and self.on_change is not None:
            self.on_change(keys, True)

    def reset(self) -> None:
        """Forget (and delete) every unpinned chunk of this layout."""
        self.drop(self.capacity.remove([e.key for e in list(self.index)]), "reset")

    # ------------------------------------------------------------------ upkeep
    def maintain(self) -> None:
        """Periodic work the caller's thread owes: start a snapshot when one is due."""
        if self._snapshots is not None and self._snapshots.due():
            self._snapshots.start(self.index.records())

    def tick(self) -> None:
        """The periodic work ``lookup`` and ``plan_stores`` otherwise do on the way, for a
        caller that keeps them off its hot thread: the fleet's heartbeat, sync or
        eviction when due, and ``maintain``."""
        if self.fleet is not None:
            self.fleet.tick()
        self.maintain()

    def close(self) -> None:
        """Leave the fleet, write the last snapshot, flush the counters."""
        if self.fleet is not None:
            self.fleet.close()
        if self._snapshots is not None:
            self._snapshots.write(self.index.records())
        self.fold_lookups()
        self.counters.flush(force=True)

    def wait_for_snapshot(self) -> None:
        """Block until a snapshot being written in the background is on disk."""
        if self._snapshots is not None:
            self._snapshots.wait()

    # ------------------------------------------------------------------ start
    def _restore_index(self) -> int:
        """Fill the index from the snapshot checked against the directory, else a full scan;
        remove stale temp files on the way. Returns how many temp files were removed."""
        interval = self.config.snapshot_interval
        self._snapshots = (SnapshotWriter(self.store, interval, clock=self.clock)
                           if interval > 0 else None)
        t0 = time.perf_counter()
        restored = restore(self.store, use_snapshot=interval > 0, clean_temp=True)
        t1 = time.perf_counter()
        self.index.load(restored.records, by_mtime=False)
        t2 = time.perf_counter()
        self.startup_seconds.update(restore=t1 - t0, index_load=t2 - t1)
        self.startup_seconds.update({f"restore.{k}": v for k, v in restored.phases.items()})
        self.counters.add("startup_from_snapshot", int(restored.source == "snapshot"))
        self.presence.unchecked = restored.unchecked
        return restored.tmp_removed
