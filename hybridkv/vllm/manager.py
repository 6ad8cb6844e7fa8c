"""Scheduler-side bookkeeping: vLLM's ``OffloadingManager`` over the index and store.

Invariants:
- ``lookup`` says HIT only for keys whose file is complete (in the index, or
  found on disk by a bounded refresh after a miss: another engine's store);
  a key restored from the index snapshot only once its file's header and
  stat show the record unchanged (else the index takes what the file says).
- Keys prepared for load are pinned until ``complete_load``; eviction never
  removes a pinned key.
- ``prepare_store`` never returns a key that is stored or being stored
  (dedup); admission, eviction and the budget are ``hybridkv.capacity``'s
  (the same code the simulator runs): what does not fit after eviction is
  skipped and counted, and every key it removes has its file deleted here.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Collection, Iterable

from vllm.distributed.kv_transfer.kv_connector.v1.offloading.metrics import (
    OffloadingConnectorStats,
)
from vllm.v1.kv_offload.base import (
    LoadStoreSpec,
    LookupResult,
    Medium,
    OffloadingEvent,
    OffloadingManager,
    OffloadKey,
    PrepareStoreOutput,
    ReqContext,
    RequestOffloadingContext,
)

from hybridkv.capacity import Capacity
from hybridkv.config import HybridKVConfig
from hybridkv.index import STORED, ChunkIndex
from hybridkv.keys import key_group
from hybridkv.policies import Candidate, CapacityPolicy, LRUPolicy, RequestView
from hybridkv.stats import Counters
from hybridkv.store.chunk_store import ChunkStore
from hybridkv.store.fleet import FleetMember, apply_listing, list_keys
from hybridkv.store.format import ChunkError
from hybridkv.store.snapshot import SnapshotWriter, recheck, restore
from hybridkv.vllm.compat import request_key_positions
from hybridkv.vllm.events import ChunkEvents
from hybridkv.vllm.metrics import DiskUsage, manager_stats
from hybridkv.vllm.transfer import ChunkLoadSpec, ChunkStoreSpec

__all__ = ["HybridKVManager"]

log = logging.getLogger(__name__)

_HIT = LookupResult.HIT
#: bytes a chunk file adds on top of its payload (safetensors + JSON header), an upper bound
HEADER_ALLOWANCE = 4096
#: fleet mode: seconds a stat that found a chunk's file is trusted before a HIT stats again
FLEET_CONFIRM_S = 1.0


class HybridKVManager(OffloadingManager):
    def __init__(self, store: ChunkStore, config: HybridKVConfig, *,
                 policy: CapacityPolicy | None = None, counters: Counters | None = None,
                 emit_events: bool = False, chunk_events: ChunkEvents | None = None):
        self.store = store
        self.layout = store.layout
        self.config = config
        self.counters = counters or Counters(None, "manager")
        self.emit_events = emit_events
        self._events: list[OffloadingEvent] = []
        #: parents of stored chunks for the connector's KV events (``hybridkv.vllm.events``)
        self.chunk_events = chunk_events
        self._miss_checked: dict[bytes, float] = {}
        self._chunk_tokens = {g.index: g.chunk_tokens for g in self.layout.groups}
        self._prompt_tokens: dict[str, int] = {}  # request id -> prompt length
        # lookups since the last fold, and of those HITs, by the key's last byte (the low
        # byte of the group index: groups g and g + 256 would be counted together)
        self._looked_up = [0] * 256
        self._found = [0] * 256
        self._gauges_sent: dict = {}  # gauge values vLLM's metrics already have
        #: seconds each phase of the start took (``benchmarks/restart.py`` reports them)
        self.startup_seconds: dict[str, float] = {}
        started = time.perf_counter()
        self.index = ChunkIndex()
        self._unchecked, removed_tmp = self._restore_index()
        mark = time.perf_counter()
        self.capacity = Capacity(self.index, policy or LRUPolicy(), config.disk_budget,
                                 headroom=config.eviction_headroom)
        self.capacity.orphans = set()  # ``_delete`` counts them as their own cause
        self.disk_usage = DiskUsage(self.index)
        self.startup_seconds["capacity"] = time.perf_counter() - mark
        self.counters.add("startup_chunks", len(self.index))
        self.counters.add("startup_tmp_removed", removed_tmp)
        log.info("hybridkv: %d chunks (%.1f MiB) found in %s in %.2fs; %d stale temp files "
                 "removed; eviction policy %s", len(self.index),
                 self.index.bytes_stored / 2**20, store.paths.layout_dir,
                 time.perf_counter() - started, removed_tmp, self.capacity.policy.name)
        mark = time.perf_counter()
        self.fleet = self._fleet_start()
        self._delete(self.capacity.enforce())
        self.counters.flush(force=True)
        self.startup_seconds["fleet_enforce_flush"] = time.perf_counter() - mark
        self.startup_seconds["total"] = time.perf_counter() - started

    @property
    def policy(self) -> CapacityPolicy:
        return self.capacity.policy

    # ------------------------------------------------------------------ lookups
    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        # the scheduler's hot path (every chunk of every waiting request): the index's
        # key -> slot table is read directly (``benchmarks/index_scale.py`` times it);
        # lookups and hits are tallied by the key's last byte (``_fold_lookups``)
        self._looked_up[key[-1]] += 1
        fleet = self.fleet
        if fleet is not None:
            self._fleet_tick()
        index = self.index
        slot = index._slot.get(key)
        if slot is not None and index._flags[slot] & STORED:
            if fleet is not None and not self._fleet_confirm(key):
                return LookupResult.MISS
            if self._unchecked and key in self._unchecked and not self._recheck(key):
                return LookupResult.MISS
        elif not self._refresh(key):
            return LookupResult.MISS
        self._found[key[-1]] += 1
        return _HIT

    def _refresh(self, key: bytes) -> bool:
        """Pick up a chunk another engine stored; at most one stat per key per interval."""
        interval = self.config.refresh_interval
        if interval <= 0 or self.index.is_pending(key):
            return False
        now = time.monotonic()
        last = self._miss_checked.get(key)
        if last is not None and now - last < interval:
            return False
        if len(self._miss_checked) > 1_000_000:
            self._miss_checked.clear()
        self._miss_checked[key] = now
        try:
            record = self.store.describe(key)
        except (OSError, ChunkError, ValueError):
            return False
        self.index.load([record])
        self._miss_checked.pop(key, None)
        self.counters.add("refresh_found", 1, record.group)
        return True

    def prepare_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> LoadStoreSpec:
        keys = list(keys)
        for key in keys:
            self.counters.add("chunks_load_prepared", 1, key_group(key))
        self.capacity.load(keys)
        return ChunkLoadSpec(keys)

    def touch(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        for key in keys:
            self.index.touch(key)

    def complete_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        keys = list(keys)
        self.capacity.load_done(keys)  # first: a dropped chunk's orphans may be among these keys
        for key in keys:
            # a load that failed verification quarantined the file: forget it (and its orphans)
            if key in self.index and not self.store.exists(key):
                self._delete(self.capacity.remove([key]), "failed_verification")
                self.counters.add("chunks_dropped_after_failed_load", 1, key_group(key))
        self._fold_lookups()
        self.counters.flush()

    # ------------------------------------------------------------------ stores
    def prepare_store(self, keys: Collection[OffloadKey],
                      req_context: ReqContext) -> PrepareStoreOutput | None:
        self._fleet_tick()
        positions = request_key_positions(req_context)  # the one private read: compat
        by_position = {(key_group(k), p): k for k, p in positions.items()}
        batch: list[Candidate] = []
        for key in keys:
            if key in self.index or self.index.is_pending(key):
                continue
            if self._refresh_on_store(key):
                continue
            group = key_group(key)
            position = positions.get(key, 0)
            batch.append(Candidate(
                key, group, position, self.layout.group(group).chunk_bytes + HEADER_ALLOWANCE,
                by_position.get((group, position - self._chunk_tokens[group]))))
        plan = self.capacity.offer(batch, RequestView(
            req_context.req_id, positions, self._prompt_tokens.get(req_context.req_id)))
        self._fleet_admit(plan)
        for cand in plan.rejected:
            self.counters.add("stores_not_admitted", 1, cand.group)
        for cand in plan.skipped:
            self.counters.add("stores_skipped_budget", 1, cand.group)
        self._delete(plan.evicted)
        admitted = {c.key for c in plan.admitted}
        chosen = [c for c in batch if c.key in admitted]  # vLLM's order: group by group
        spec = ChunkStoreSpec([c.key for c in chosen], [c.position for c in chosen],
                              [c.parent for c in chosen])
        return PrepareStoreOutput(keys_to_store=spec.keys, store_spec=spec,
                                  evicted_keys=plan.evicted)

    def _refresh_on_store(self, key: bytes) -> bool:
        """Dedup against another engine's file for the same key."""
        if not self.store.exists(key):
            return False
        self._miss_checked.pop(key, None)
        return self._refresh(key)

    def complete_store(self, keys: Collection[OffloadKey], req_context: ReqContext,
                       success: bool = True) -> None:
        stored, evicted = [], []
        for key in keys:
            if not self.index.is_pending(key):
                continue
            self._fleet_done(key)
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
            stored.append(key)
            if self.emit_events and self.chunk_events is not None:
                self.chunk_events.note_stored(key, record.parent)
        if stored and self.emit_events:
            self._events.append(OffloadingEvent(keys=stored, medium=Medium.STORAGE, removed=False))
        self._delete(evicted)
        self._fold_lookups()
        self.counters.flush()
        self._maybe_snapshot()

    def note_prompt_tokens(self, req_id: str, num_tokens: int) -> None:
        """The connector tells the prompt length of a request before its stores."""
        self._prompt_tokens[req_id] = num_tokens

    def on_request_finished(self, req_context: ReqContext) -> None:
        self.capacity.request_finished(req_context.req_id)
        self._prompt_tokens.pop(req_context.req_id, None)

    # ------------------------------------------------------------------ eviction
    def _delete(self, keys: list[bytes], cause: str = "budget") -> None:
        """Delete the files of keys the capacity layer removed from the index.

        ``cause`` (counted per group as ``chunks_evicted_<cause>``): budget, orphan (the
        capacity layer took the key along with another), failed_verification, gone, reset.
        """
        if self.fleet is not None:
            self._fleet_unlink(keys)
        else:
            for key in keys:
                self.store.delete(key)
        for key in keys:
            self._count_evicted(key, cause)
        self.capacity.orphans.clear()
        if keys and self.emit_events:
            self._events.append(OffloadingEvent(keys=keys, medium=Medium.STORAGE, removed=True))

    # ------------------------------------------------------------------ misc
    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        return RequestOffloadingContext()

    def take_events(self) -> Iterable[OffloadingEvent]:
        self._maybe_snapshot()
        events, self._events = self._events, []
        return events

    def get_stats(self) -> OffloadingConnectorStats | None:
        """This step's counter gains and changed gauges for vLLM's ``/metrics``
        (``hybridkv.vllm.metrics``)."""
        self._fold_lookups()
        return manager_stats(self.counters, self.layout, self.disk_usage,
                             self.config.disk_budget, self._gauges_sent)

    def _fold_lookups(self) -> None:
        """Move the lookup tallies into the counters, as tokens per group."""
        if not any(self._looked_up):
            return
        for name, tally in (("lookup_tokens", self._looked_up),
                            ("lookup_hit_tokens", self._found)):
            for group, tokens in self._chunk_tokens.items():
                n, tally[group & 0xFF] = tally[group & 0xFF], 0
                if n:
                    self.counters.add(name, n * tokens, group)

    def reset_cache(self) -> None:
        """Forget (and delete) every unpinned chunk of this layout."""
        self._delete(self.capacity.remove([e.key for e in list(self.index)]), "reset")

    def shutdown(self) -> None:
        if self.fleet is not None:
            self.fleet.close()
            self._fleet_pool.shutdown(wait=False)
        if self._snapshots is not None:
            self._snapshots.write(self.index.records())
        self._fold_lookups()
        self.counters.flush(force=True)

    # ------------------------------------------------------------------ snapshots
    def _restore_index(self) -> tuple[set[bytes], int]:
        """Fill the index from the snapshot checked against the directory, else a full scan;
        remove stale temp files on the way.

        Returns the keys whose file size/mtime must be rechecked before their first HIT,
        and how many temp files were removed.
        """
        interval = self.config.snapshot_interval
        self._snapshots = SnapshotWriter(self.store, interval) if interval > 0 else None
        t0 = time.perf_counter()
        restored = restore(self.store, use_snapshot=interval > 0, clean_temp=True)
        t1 = time.perf_counter()
        self.index.load(restored.records, by_mtime=False)
        t2 = time.perf_counter()
        self.startup_seconds.update(restore=t1 - t0, index_load=t2 - t1)
        self.startup_seconds.update({f"restore.{k}": v for k, v in restored.phases.items()})
        self.counters.add("startup_from_snapshot", int(restored.source == "snapshot"))
        return restored.unchecked, restored.tmp_removed

    def _recheck(self, key: bytes) -> bool:
        """First HIT of a chunk restored from a snapshot: is its file what the index says?"""
        self._unchecked.discard(key)
        entry = self.index.get(key)
        same, record = recheck(self.store, key, entry.size, entry.mtime_ns,
                               position=entry.position, parent=entry.parent)
        if same:
            return True
        if record is None:  # gone or unusable: forget it (as after a failed load)
            self._delete(self.capacity.remove([key]), "gone")
            self.counters.add("restored_chunks_gone", 1, key_group(key))
            return False
        self.index.remove(key)  # rewritten since the snapshot: index what is there now
        self.index.load([record])
        self.counters.add("restored_chunks_changed", 1, key_group(key))
        return True

    def _maybe_snapshot(self) -> None:
        if self._snapshots is not None and self._snapshots.due():
            self._snapshots.start(self.index.records())

    # ------------------------------------------------------------------ fleet budget
    def _fleet_start(self) -> FleetMember | None:
        """Fleet mode (``hybridkv.store.fleet``): one budget for every engine on the directory."""
        c = self.config
        if not c.fleet_enabled:
            return None
        self._fleet_sizes: dict[bytes, int] = {}  # key -> bytes admitted for its store
        self._fleet_confirmed: dict[bytes, float] = {}  # key -> when a stat found its file
        self.fleet = FleetMember(self.store.paths.layout_dir, c.disk_budget,
                                 interval=c.fleet_interval, lease_ttl=c.fleet_lease_ttl,
                                 initial_bytes=self.index.bytes_stored, io=self.store.io)
        self.capacity.budget = None  # only the lease holder evicts
        self._fleet_listing = None  # (usage snapshot, future of list_keys) while a sync lists
        self._fleet_pool = ThreadPoolExecutor(1, thread_name_prefix="hybridkv-fleet")
        self._fleet_tick(force=True)
        return self.fleet

    def _fleet_tick(self, force: bool = False) -> None:
        """Heartbeat, lease, and (holder) sync or evict when due; a clock read otherwise."""
        fleet = self.fleet
        if fleet is None:
            return
        action = fleet.poll(force)
        self.capacity.budget = self.config.disk_budget if fleet.holder else None
        if action == "sync" or (self._fleet_listing is not None
                                and self._fleet_listing[1].done()):
            self._fleet_sync()
        elif action == "evict":
            self._fleet_evict(fleet.wanted)  # room for the largest refused batch

    def _fleet_sync(self, wait: bool = False) -> None:
        """Holder: list the directory (in a thread), then index what it found, evict for
        the fleet and publish. Returns at once while the listing runs (unless ``wait``)."""
        fleet = self.fleet
        if self._fleet_listing is None:
            snapshot = fleet.begin_sync()  # before listing: the baselines of what we list
            self._fleet_listing = (snapshot, self._fleet_pool.submit(list_keys, self.store))
        snapshot, listing = self._fleet_listing
        if not (wait or listing.done()):
            return
        self._fleet_listing = None
        try:
            seen = listing.result()
        except OSError as exc:
            log.warning("hybridkv fleet: cannot list %s: %s", self.store.paths.layout_dir, exc)
            return
        if not fleet.holder:
            return  # lost the lease meanwhile: the next holder syncs
        added, gone = apply_listing(  # a vanished chunk takes its orphans (policy) along
            self.store, self.index, seen,
            remove=lambda keys: self._delete(self.capacity.remove(keys), "gone"))
        self.counters.add("fleet_syncs")
        self.counters.add("fleet_found", added)
        self.counters.add("fleet_gone", gone)
        # base = what the listing saw (files stored since the usage snapshot and not listed
        # count through their engine's admitted bytes), then evict against the new state
        listed = 0
        for key in seen:
            entry = self.index.get(key)
            listed += entry.size if entry is not None else 0
        fleet.finish_sync(snapshot, listed)
        self._fleet_evict(fleet.wanted)

    def _fleet_evict(self, extra: int) -> None:
        """Holder: evict until the fleet's usage + ``extra`` leaves the free target."""
        fleet = self.fleet
        over = fleet.excess(self.capacity.headroom, extra)
        if over <= 0:
            return
        before = self.index.bytes_used
        self._fleet_shed(over)
        if before - self.index.bytes_used < over and fleet.clock() - fleet.last_sync >= max(
                fleet.poll_s, fleet.interval / 5):
            self._fleet_sync()  # the rest is in chunks of other engines we have not indexed

    def _fleet_shed(self, over: int) -> None:
        """Evict ``over`` bytes from the index with the capacity policy (group-aware)."""
        cap = self.capacity
        cap.budget = max(0, self.index.bytes_used - over)
        try:
            removed = cap.enforce()
        finally:
            cap.budget = self.config.disk_budget
        self._delete(removed)

    def _fleet_admit(self, plan) -> None:
        """Keep the admitted chunks the fleet has room for (in plan order); skip the rest."""
        fleet = self.fleet
        if fleet is None:
            return
        for i, cand in enumerate(plan.admitted):
            ok = fleet.admit(cand.size)
            if not ok and fleet.holder:
                fleet.unblock()
                self._fleet_evict(sum(c.size for c in plan.admitted[i:]))
                ok = fleet.admit(cand.size)
            if not ok:  # nothing past a chunk that did not fit is worth storing
                for rest in plan.admitted[i:]:
                    self.capacity.abort(rest.key)
                    self.counters.add("fleet_refused", 1, rest.group)
                plan.skipped += plan.admitted[i:]
                del plan.admitted[i:]
                return
            self._fleet_sizes[cand.key] = cand.size

    def _fleet_done(self, key: bytes) -> None:
        """A store ended: its reservation leaves the flight; the fleet keeps the file's size."""
        if self.fleet is not None:
            reserved = self._fleet_sizes.pop(key, 0)
            try:
                actual = self.store.path(key).stat().st_size
            except OSError:
                actual = 0  # nothing written
            self.fleet.done(reserved, actual)

    def _fleet_confirm(self, key: bytes) -> bool:
        """Before a HIT: does the file still exist (another engine may have evicted it)?"""
        now = time.monotonic()
        last = self._fleet_confirmed.get(key)
        if last is not None and now - last < FLEET_CONFIRM_S:
            return True
        try:
            self.store.path(key).stat()
        except FileNotFoundError:
            self._fleet_confirmed.pop(key, None)
            self._delete(self.capacity.remove([key]), "gone")  # with its orphans; pinned stay
            self.counters.add("fleet_vanished", 1, key_group(key))
            return False
        except OSError:
            return True  # cannot tell: a load that fails is recomputed
        if len(self._fleet_confirmed) > 1_000_000:
            self._fleet_confirmed.clear()
        self._fleet_confirmed[key] = now
        return True

    def _count_evicted(self, key: bytes, cause: str) -> None:
        group = key_group(key)
        self.counters.add("chunks_evicted", 1, group)
        if key in self.capacity.orphans:
            cause = "orphan"
        self.counters.add(f"chunks_evicted_{cause}", 1, group)

    def _fleet_unlink(self, keys: list[bytes]) -> None:
        """``_delete``'s unlinks in fleet mode: the holder lowers the fleet's usage by what
        it unlinked."""
        freed = 0
        for key in keys:
            try:
                size = self.store.path(key).stat().st_size
            except OSError:
                size = 0
            if self.store.delete(key):
                freed += size
            self._fleet_confirmed.pop(key, None)
        if self.fleet.holder:
            self.fleet.freed(freed)
