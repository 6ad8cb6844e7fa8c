"""Scheduler-side bookkeeping: vLLM's ``OffloadingManager`` over the index and store.

Invariants:
- ``lookup`` says HIT only for keys whose file is complete (in the index, or
  found on disk by a bounded refresh after a miss: another engine's store).
- Keys prepared for load are pinned until ``complete_load``; eviction never
  removes a pinned key.
- ``prepare_store`` never returns a key that is stored or being stored
  (dedup), and never lets ``bytes_used`` exceed the budget: what does not fit
  after eviction is skipped and counted.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Collection, Iterable

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

from hybridkv.config import HybridKVConfig
from hybridkv.index import ChunkIndex
from hybridkv.keys import key_group
from hybridkv.stats import Counters
from hybridkv.store.chunk_store import ChunkStore
from hybridkv.store.format import ChunkError
from hybridkv.vllm.transfer import ChunkLoadSpec, ChunkStoreSpec

__all__ = ["HybridKVManager"]

log = logging.getLogger(__name__)

#: bytes a chunk file adds on top of its payload (safetensors + JSON header), an upper bound
HEADER_ALLOWANCE = 4096


class HybridKVManager(OffloadingManager):
    def __init__(self, store: ChunkStore, config: HybridKVConfig, *, policy=None,
                 counters: Counters | None = None, emit_events: bool = False):
        self.store = store
        self.layout = store.layout
        self.config = config
        self.policy = policy
        self.counters = counters or Counters(None, "manager")
        self.emit_events = emit_events
        self._events: list[OffloadingEvent] = []
        self._miss_checked: dict[bytes, float] = {}
        self._chunk_tokens = {g.index: g.chunk_tokens for g in self.layout.groups}
        started = time.monotonic()
        removed_tmp = store.clean_temp()
        self.index = ChunkIndex.rebuild(store)
        self.counters.add("startup_chunks", len(self.index))
        self.counters.add("startup_tmp_removed", removed_tmp)
        log.info("hybridkv: %d chunks (%.1f MiB) found in %s in %.2fs; %d stale temp files removed",
                 len(self.index), self.index.bytes_stored / 2**20, store.paths.layout_dir,
                 time.monotonic() - started, removed_tmp)
        if self.config.disk_budget is not None and self.index.bytes_used > self.config.disk_budget:
            self._evict(self.index.bytes_used - self.config.disk_budget)
        self.counters.flush(force=True)

    # ------------------------------------------------------------------ lookups
    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        if key in self.index:
            return LookupResult.HIT
        if self._refresh(key):
            return LookupResult.HIT
        return LookupResult.MISS

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
        path = self.store.path(key)
        try:
            st = os.stat(path)
            header = self.store.header_of(path)
        except (OSError, ChunkError, ValueError):
            return False
        if header.fingerprint != self.store.fingerprint or header.group != key_group(key):
            return False
        self.index.add(key, group=header.group, position=header.position, size=st.st_size,
                       parent=bytes.fromhex(header.parent) if header.parent else None)
        self._miss_checked.pop(key, None)
        self.counters.add("refresh_found", 1, header.group)
        return True

    def prepare_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> LoadStoreSpec:
        keys = list(keys)
        for key in keys:
            self.index.pin(key)
            self.index.touch(key)
            self.counters.add("chunks_load_prepared", 1, key_group(key))
        return ChunkLoadSpec(keys)

    def touch(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        for key in keys:
            self.index.touch(key)
            if self.policy is not None and key in self.index:
                self.policy.on_access(key, self.index)

    def complete_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        for key in keys:
            self.index.unpin(key)
            # a load that failed verification quarantined the file: forget it
            if key in self.index and not self.store.exists(key):
                self._forget(key)
                self.counters.add("chunks_dropped_after_failed_load", 1, key_group(key))
        self.counters.flush()

    # ------------------------------------------------------------------ stores
    def prepare_store(self, keys: Collection[OffloadKey],
                      req_context: ReqContext) -> PrepareStoreOutput | None:
        positions = _key_positions(req_context)
        by_position = {(key_group(k), p): k for k, p in positions.items()}
        todo: list[bytes] = []
        for key in keys:
            if key in self.index or self.index.is_pending(key):
                continue
            if self._refresh_on_store(key):
                continue
            todo.append(key)
        evicted: list[bytes] = []
        admitted: list[bytes] = []
        budget = self.config.disk_budget
        for key in todo:
            group = key_group(key)
            size = self.layout.group(group).chunk_bytes + HEADER_ALLOWANCE
            position = positions.get(key, 0)
            parent = by_position.get((group, position - self._chunk_tokens[group]))
            if self.policy is not None and not self.policy.admit(
                    _Candidate(key, group, position, size, parent, req_context.req_id), self.index):
                self.counters.add("stores_not_admitted", 1, group)
                continue
            if budget is not None and self.index.bytes_used + size > budget:
                evicted += self._evict(self.index.bytes_used + size - budget)
                if self.index.bytes_used + size > budget:
                    self.counters.add("stores_skipped_budget", 1, group)
                    continue
            self.index.reserve(key, size)
            admitted.append((key, position, parent))
        if evicted and self.emit_events:
            self._events.append(OffloadingEvent(keys=evicted, medium=Medium.STORAGE, removed=True))
        spec = ChunkStoreSpec([k for k, _, _ in admitted], [p for _, p, _ in admitted],
                              [par for _, _, par in admitted])
        return PrepareStoreOutput(keys_to_store=spec.keys, store_spec=spec, evicted_keys=evicted)

    def _refresh_on_store(self, key: bytes) -> bool:
        """Dedup against another engine's file for the same key."""
        if not self.store.exists(key):
            return False
        self._miss_checked.pop(key, None)
        return self._refresh(key)

    def complete_store(self, keys: Collection[OffloadKey], req_context: ReqContext,
                       success: bool = True) -> None:
        stored = []
        for key in keys:
            if not self.index.is_pending(key):
                continue
            self.index.release(key)
            group = key_group(key)
            try:
                st = os.stat(self.store.path(key))
                header = self.store.header_of(self.store.path(key))
            except (OSError, ChunkError, ValueError):
                self.counters.add("stores_failed", 1, group)
                continue
            self.index.add(key, group=group, position=header.position, size=st.st_size,
                           parent=bytes.fromhex(header.parent) if header.parent else None)
            self.counters.add("chunks_stored", 1, group)
            stored.append(key)
        if stored and self.emit_events:
            self._events.append(OffloadingEvent(keys=stored, medium=Medium.STORAGE, removed=False))
        budget = self.config.disk_budget
        if budget is not None and self.index.bytes_used > budget:
            # actual sizes can exceed the reservation only by the header allowance
            self._emit_removed(self._evict(self.index.bytes_used - budget))
        self.counters.flush()

    # ------------------------------------------------------------------ eviction
    def _evict(self, needed: int) -> list[bytes]:
        if self.policy is not None:
            victims = self.policy.make_room(self.index, needed)
        else:
            victims = self._lru_victims(needed)
        removed = []
        for key in victims:
            entry = self.index.get(key)
            if entry is None or entry.pins:
                continue
            self.store.delete(key)
            self._forget(key)
            self.counters.add("chunks_evicted", 1, entry.group)
            removed.append(key)
        return removed

    def _lru_victims(self, needed: int) -> list[bytes]:
        victims, freed = [], 0
        for entry in sorted(self.index, key=lambda e: e.last_access):
            if freed >= needed:
                break
            if entry.pins:
                continue
            victims.append(entry.key)
            freed += entry.size
        return victims

    def _forget(self, key: bytes) -> None:
        self.index.remove(key)
        if self.policy is not None:
            self.policy.on_removed(key, self.index)

    def _emit_removed(self, keys: list[bytes]) -> None:
        if keys and self.emit_events:
            self._events.append(OffloadingEvent(keys=keys, medium=Medium.STORAGE, removed=True))

    # ------------------------------------------------------------------ misc
    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        return RequestOffloadingContext()

    def take_events(self) -> Iterable[OffloadingEvent]:
        events, self._events = self._events, []
        return events

    def reset_cache(self) -> None:
        """Forget (and delete) every unpinned chunk of this layout."""
        self._emit_removed(self._evict(self.index.bytes_used + 1))

    def shutdown(self) -> None:
        self.counters.flush(force=True)


class _Candidate:
    """A chunk the scheduler wants stored, as admission policies see it."""

    __slots__ = ("key", "group", "position", "size", "parent", "request_id")

    def __init__(self, key, group, position, size, parent, request_id):
        self.key, self.group, self.position = key, group, position
        self.size, self.parent, self.request_id = size, parent, request_id


def _key_positions(req_context: ReqContext) -> dict[bytes, int]:
    # vLLM records every offload key's end position on the request context
    return getattr(req_context, "_offload_key_positions", {}) or {}
