"""``HybridKVManager``: vLLM's ``OffloadingManager`` over hybridkv's ``CacheService``.

vLLM glue only: every decision (what is a HIT, what to store, what to evict, the
snapshot, the fleet) is ``hybridkv.cache.CacheService``'s; this class translates
vLLM's calls and types to it and back.

Invariants:
- ``lookup`` is HIT exactly when ``CacheService.lookup`` is True.
- Keys returned by ``prepare_store`` are those the service admitted, in vLLM's order;
  ``evicted_keys`` are keys whose files the service already deleted.
- With KV events on, every key the service reports stored or removed becomes one
  ``OffloadingEvent`` on medium STORAGE, in the order the service reported them.
"""

from __future__ import annotations

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

from hybridkv.cache import CacheService
from hybridkv.config import HybridKVConfig
from hybridkv.policies import CapacityPolicy
from hybridkv.stats import Counters
from hybridkv.store.chunk_store import ChunkStore
from hybridkv.vllm.compat import request_key_positions
from hybridkv.vllm.events import ChunkEvents
from hybridkv.vllm.metrics import DiskUsage, manager_stats
from hybridkv.vllm.transfer import ChunkLoadSpec, ChunkStoreSpec

__all__ = ["HybridKVManager"]

_HIT = LookupResult.HIT
_MISS = LookupResult.MISS


class HybridKVManager(OffloadingManager):
    def __init__(self, store: ChunkStore, config: HybridKVConfig, *,
                 policy: CapacityPolicy | None = None, counters: Counters | None = None,
                 emit_events: bool = False, chunk_events: ChunkEvents | None = None,
                 **service_options):
        self.emit_events = emit_events
        self._events: list[OffloadingEvent] = []
        #: parents of stored chunks for the connector's KV events (``hybridkv.vllm.events``)
        self.chunk_events = chunk_events
        self._gauges_sent: dict = {}  # gauge values vLLM's metrics already have
        self.cache = CacheService(store, config, policy=policy, counters=counters,
                                  on_change=self._on_change if emit_events else None,
                                  **service_options)
        self.disk_usage = DiskUsage(self.cache.index)
        self._lookup = self.cache.lookup

    # the service's parts, for callers that inspect a manager (tests, benchmarks)
    store = property(lambda self: self.cache.store)
    layout = property(lambda self: self.cache.layout)
    index = property(lambda self: self.cache.index)
    capacity = property(lambda self: self.cache.capacity)
    policy = property(lambda self: self.cache.policy)
    config = property(lambda self: self.cache.config)
    counters = property(lambda self: self.cache.counters)
    startup_seconds = property(lambda self: self.cache.startup_seconds)

    # ------------------------------------------------------------------ lookups and loads
    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        return _HIT if self._lookup(key) else _MISS

    def prepare_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> LoadStoreSpec:
        keys = list(keys)
        self.cache.load_started(keys)
        return ChunkLoadSpec(keys)

    def touch(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        self.cache.touch(keys)

    def complete_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        self.cache.load_done(keys)

    # ------------------------------------------------------------------ stores
    def prepare_store(self, keys: Collection[OffloadKey],
                      req_context: ReqContext) -> PrepareStoreOutput | None:
        positions = request_key_positions(req_context)  # the one private read: compat
        plan = self.cache.plan_stores(keys, positions, req_context.req_id)
        chosen = plan.admitted
        spec = ChunkStoreSpec([c.key for c in chosen], [c.position for c in chosen],
                              [c.parent for c in chosen])
        return PrepareStoreOutput(keys_to_store=spec.keys, store_spec=spec,
                                  evicted_keys=plan.evicted)

    def complete_store(self, keys: Collection[OffloadKey], req_context: ReqContext,
                       success: bool = True) -> None:
        stored = self.cache.store_done(keys)
        if self.emit_events and self.chunk_events is not None:
            for record in stored:
                self.chunk_events.note_stored(record.key, record.parent)

    def note_prompt_tokens(self, req_id: str, num_tokens: int) -> None:
        """The connector tells the prompt length of a request before its stores."""
        self.cache.note_prompt_tokens(req_id, num_tokens)

    def on_request_finished(self, req_context: ReqContext) -> None:
        self.cache.request_finished(req_context.req_id)

    # ------------------------------------------------------------------ events, metrics
    def _on_change(self, keys: list[bytes], removed: bool) -> None:
        self._events.append(OffloadingEvent(keys=keys, medium=Medium.STORAGE, removed=removed))

    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        return RequestOffloadingContext()

    def take_events(self) -> Iterable[OffloadingEvent]:
        self.cache.maintain()
        events, self._events = self._events, []
        return events

    def get_stats(self) -> OffloadingConnectorStats | None:
        """This step's counter gains and changed gauges for vLLM's ``/metrics``
        (``hybridkv.vllm.metrics``)."""
        self.cache.fold_lookups()
        floor = self.cache.disk_floor
        return manager_stats(self.cache.counters, self.cache.layout, self.disk_usage,
                             self.cache.config.disk_budget, self._gauges_sent,
                             free=floor.free, floor=floor.floor if floor.probes else None)

    # ------------------------------------------------------------------ lifetime
    def reset_cache(self) -> None:
        """Forget (and delete) every unpinned chunk of this layout."""
        self.cache.reset()

    def shutdown(self) -> None:
        self.cache.close()
