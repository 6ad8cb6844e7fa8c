"""``HybridKVTier``: hybridkv as a secondary tier under vLLM's CPU tier.

vLLM's ``TieringOffloadingSpec`` keeps hits in host memory (its CPU tier) and
cascades every chunk stored there to its secondary tiers; a lookup that misses
the CPU tier asks them and promotes a hit back into a CPU slot. This tier is
hybridkv's disk under it: enabled by naming it in ``secondary_tiers`` (see
``hybridkv.vllm.tier_transfer_config``), with the settings of the direct mode.

vLLM glue only: what to store, evict, report as a HIT, the budget, the fleet and
the snapshot are ``CacheService``'s; threads and the no-I/O rule are ``JobRunner``'s;
which bytes of a slot belong to a group is ``SlotLayout``'s.

Invariants:
- Every method vLLM calls runs on its scheduler thread and does no file I/O:
  ``lookup`` is HIT or MISS from memory, or RETRY while a disk check runs.
- A promotion writes into a CPU slot only a chunk that passed verification, and only
  the bytes of the key's group; a key that failed is left out of ``successful_keys``
  (never an engine error), and vLLM then recomputes it.
- A store writes only the bytes of the key's group, in the direct mode's file format
  and directory: the direct spec and this tier share a cache directory.
"""

from __future__ import annotations

import collections
from collections.abc import Collection, Iterable
from typing import Any, ClassVar

import numpy as np
from vllm.v1.kv_offload.base import (
    LookupResult,
    Medium,
    OffloadingEvent,
    OffloadKey,
    ReqContext,
    RequestOffloadingContext,
    ScheduleEndContext,
)
from vllm.v1.kv_offload.tiering.base import JobResult, SecondaryTierManager, TransferJob

from hybridkv.cache import CacheService
from hybridkv.cache.jobs import JobRunner
from hybridkv.config import ConfigError, HybridKVConfig
from hybridkv.keys import key_group
from hybridkv.stats import Counters
from hybridkv.store.format import ChunkTooNew
from hybridkv.vllm.compat import request_key_positions
from hybridkv.vllm.events import ChunkEvents, group_event_specs
from hybridkv.vllm.layout import layout_from_vllm
from hybridkv.vllm.metrics import DiskUsage, manager_stats, metric_definitions
from hybridkv.vllm.slot_layout import SlotLayout
from hybridkv.vllm.spec import handed_kv_cache_config, make_policy_for, open_store, too_new

__all__ = ["HybridKVTier", "TIER_KEYS"]

#: keys vLLM's tier factory passes to every tier that are not hybridkv settings
TIER_KEYS = frozenset({"locality"})

_RESULT = {True: LookupResult.HIT, False: LookupResult.MISS, None: LookupResult.RETRY}


class HybridKVTier(SecondaryTierManager):
    medium: ClassVar[Medium] = Medium.STORAGE

    @classmethod
    def build_metric_definitions(cls, extra_config: dict[str, Any]):
        return metric_definitions()

    def __init__(self, offloading_spec, primary_kv_view: memoryview, tier_type: str,
                 backpressure_detector=None, **settings: Any):
        super().__init__(offloading_spec, primary_kv_view, tier_type, backpressure_detector)
        handed = handed_kv_cache_config()
        if handed is None:
            raise ConfigError(
                "HybridKVTier needs kv_connector='HybridKVConnector' and "
                "kv_connector_module_path='hybridkv.vllm.connector' (it reads each group's "
                "kind and slot layout from vLLM's KV-cache config); "
                "hybridkv.vllm.tier_transfer_config builds the whole config")
        kv_cache_config, hidden_size = handed
        try:
            config = HybridKVConfig.from_extra_config(
                {k: v for k, v in settings.items() if k not in TIER_KEYS})
        except ConfigError as exc:
            raise ConfigError(f"secondary_tiers[{tier_type}]: {exc}") from None
        config.check_directory()
        spec_config = offloading_spec.config
        self.layout = layout_from_vllm(spec_config, kv_cache_config)
        self.slots = SlotLayout.from_vllm(spec_config, kv_cache_config, self.layout,
                                          self.block_size_bytes)
        self._rows = np.asarray(primary_kv_view).view(np.uint8).reshape(-1, self.block_size_bytes)
        store = open_store(config, self.layout, 0)
        self.chunk_events = ChunkEvents(group_event_specs(
            kv_cache_config, {g.index: g.chunk_tokens for g in self.layout.groups}))
        self.emit_events = offloading_spec.kv_events_config.enable_kv_cache_events
        self._events: collections.deque[OffloadingEvent] = collections.deque()
        try:
            self.cache = CacheService(
                store, config, policy=make_policy_for(config, self.layout, hidden_size),
                # the counters file at most once a second (forced at shutdown): a write
                # per job would be the control thread's largest cost
                counters=Counters(store.paths.stats_dir, "tier", io=store.io,
                                  min_interval=1.0),
                on_change=self._on_change if self.emit_events else None)
        except ChunkTooNew as exc:
            raise too_new(store, exc) from exc
        self.disk_usage = DiskUsage(self.cache.index)
        self.runner = JobRunner(self.cache, io_threads=config.io_threads)
        self._gauges_sent: dict = {}

    config = property(lambda self: self.cache.config)

    # ------------------------------------------------------------------ lookups
    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        return _RESULT[self.runner.lookup(key)]

    def touch(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        self.runner.touch(keys)

    # ------------------------------------------------------------------ transfers
    def submit_store(self, job_metadata: TransferJob) -> None:
        row_of, slots = self._rows_of(job_metadata), self.slots

        def read(key: bytes):
            return slots.gather(row_of[key], key_group(key))

        ctx = job_metadata.req_context
        self.runner.submit_store(job_metadata.job_id, list(row_of), request_key_positions(ctx),
                                 ctx.req_id, read)

    def submit_load(self, job_metadata: TransferJob) -> None:
        row_of, slots = self._rows_of(job_metadata), self.slots

        def fill(key: bytes, header, arrays) -> None:
            slots.scatter(row_of[key], key_group(key), arrays, header.block_offset)

        self.runner.submit_load(job_metadata.job_id, list(row_of), fill)

    def _rows_of(self, job: TransferJob) -> dict[bytes, np.ndarray]:
        """Each key of ``job`` -> its CPU slot (a row of the region), in the job's order."""
        rows = self._rows
        return {key: rows[int(c)] for key, c in zip(job.keys, job.chunk_ids)}

    def get_finished_jobs(self) -> Iterable[JobResult]:
        results = []
        for o in self.runner.finished():
            success = o.ok and not o.failed
            partial = tuple(o.done) if o.is_load and not success and o.ok and o.done else None
            results.append(JobResult(job_id=o.job_id, success=success, successful_keys=partial,
                                     transfer_time=o.seconds, transfer_bytes=o.nbytes or None))
        return results

    def has_pending_work(self) -> bool:
        return self.runner.pending()

    def drain_jobs(self) -> None:
        self.runner.drain()

    # ------------------------------------------------------------------ requests
    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        return RequestOffloadingContext()

    def note_prompt_tokens(self, req_id: str, num_tokens: int) -> None:
        """``HybridKVConnector`` tells the prompt length of a request before its stores."""
        self.runner.note_prompt_tokens(req_id, num_tokens)

    def on_request_finished(self, req_context: ReqContext) -> None:
        self.runner.request_finished(req_context.req_id)

    def on_schedule_end(self, context: ScheduleEndContext) -> None:
        self.runner.tick()

    # ------------------------------------------------------------------ events, metrics
    def _on_change(self, keys: list[bytes], removed: bool) -> None:
        # the control thread, under the service's lock: the index has the parents
        if not removed:
            index = self.cache.index
            for key in keys:
                entry = index.get(key)
                self.chunk_events.note_stored(key, entry.parent if entry else None)
        self._events.append(OffloadingEvent(keys=keys, medium=Medium.STORAGE, removed=removed))

    def take_events(self) -> Iterable[OffloadingEvent]:
        out = []
        while self._events:
            out.append(self._events.popleft())
        return out

    def get_stats(self):
        """This step's counter gains and changed gauges (None while the service is busy:
        they are carried to the next step)."""
        def read(cache: CacheService):
            cache.fold_lookups()
            return manager_stats(cache.counters, self.layout, self.disk_usage,
                                 cache.config.disk_budget, self._gauges_sent)
        return self.runner.stats(read)

    # ------------------------------------------------------------------ lifetime
    def shutdown(self) -> None:
        self.runner.close()
        self._rows = None  # vLLM closes the region's mmap next: no view may outlive it
