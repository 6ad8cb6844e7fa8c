"""``HybridKVConnector``: vLLM's ``OffloadingConnector`` with hybridkv's spec plugged in.

It fills in ``spec_name`` / ``spec_module_path`` so users name only the
connector, hands vLLM's ``KVCacheConfig`` to the spec (which needs each
group's kind and window), and counts the tokens each request gets from disk.
It inherits ``SupportsHMA``, so vLLM keeps the hybrid memory allocator on.
With ``spec_name: TieringOffloadingSpec`` (``hybridkv.vllm.tier_transfer_config``)
it runs vLLM's CPU tier with ``HybridKVTier`` under it: the same hand-over of the
KV-cache config, the prompt lengths go to the tier, and hit counts are vLLM's own
(by source: host or disk).

Failed loads (worker side) reach vLLM as ``failed_recving`` request ids, the
path vLLM provides for models with several KV cache groups; vLLM's own
offloading worker cannot report them (it asserts every job succeeded). vLLM
then recomputes the request from scratch (``kv_load_failure_policy=
"recompute"``) or ends it with an error (``"fail"``). On the scheduler side a
request whose load failed looks up with ``max_num_new_tokens=0`` until it
finishes: its retry recomputes instead of loading the same (possibly still
unreadable) file again, so a persistent read error cannot loop.

Stores that failed with ENOSPC/EDQUOT reach the scheduler side in the workers'
stats of the step (``KVConnectorOutput.kv_connector_stats``, the
``store_failures_by_cause`` series); the service then evicts and backs off.

Only public vLLM API here (0.32 and 0.33): the job -> request map of loads
comes from the connector metadata's ``load_jobs`` (``start_load_kv``), not
the worker's private ``_load_jobs``; the no-reload rule goes through the
scheduler's ``get_num_new_matched_tokens``, not its private ``_req_status``.
The one private read left is in ``hybridkv.vllm.compat``.

Hits that pay (``hit_cost_rule``): the scheduler side times every engine step (between
``build_connector_meta`` calls) and every load (``update_state_after_alloc`` to its
``finished_recving``) for ``CacheService``; a servable hit the service says does not pay
is looked up again with ``max_num_new_tokens=0``, so vLLM recomputes it.
"""

from __future__ import annotations

import time

from vllm.config import VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1 import KVConnectorRole
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults
from vllm.distributed.kv_transfer.kv_connector.v1.offloading_connector import (
    OffloadingConnector,
)
from vllm.v1.kv_cache_interface import KVCacheConfig
from vllm.v1.outputs import KVConnectorOutput

from hybridkv.vllm.manager import HybridKVManager
from hybridkv.vllm.metrics import no_space_failures, worker_stats
from hybridkv.vllm.spec import kv_cache_config_context
from hybridkv.vllm.tier import HybridKVTier

__all__ = ["HybridKVConnector"]

SPEC_NAME = "HybridKVSpec"
SPEC_MODULE = "hybridkv.vllm.spec"


class HybridKVConnector(OffloadingConnector):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig):
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config
        if extra.setdefault("spec_name", SPEC_NAME) == SPEC_NAME:
            extra.setdefault("spec_module_path", SPEC_MODULE)
        hidden = vllm_config.model_config.get_hidden_size() if vllm_config.model_config else None
        #: worker side: load job id -> request id, until the request's load finishes
        self._load_requests: dict[int, str] = {}
        #: scheduler side: requests whose load failed; they never load again
        self._no_reload: set[str] = set()
        #: scheduler side: request id -> (monotonic time its load was scheduled, tokens)
        self._loads_started: dict[str, tuple[float, int]] = {}
        #: scheduler side: (monotonic time, tokens) of the last step scheduled
        self._last_step: tuple[float, int] | None = None
        with kv_cache_config_context(kv_cache_config, hidden_size=hidden):
            super().__init__(vllm_config, role, kv_cache_config)

    def _hybridkv(self):
        """hybridkv's object behind vLLM's scheduler-side manager: the ``HybridKVManager``
        itself (direct) or the ``HybridKVTier`` among the tiering manager's tiers."""
        manager = self.scheduler.manager
        for tier in getattr(manager, "secondary_tiers", ()):
            if isinstance(tier, HybridKVTier):
                return tier
        return manager

    def _direct(self) -> HybridKVManager | None:
        manager = self.scheduler.manager
        return manager if isinstance(manager, HybridKVManager) else None

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        # the policy's likely hit points depend on the prompt length (chunk-aligned repeats)
        side = self._hybridkv()
        if hasattr(side, "note_prompt_tokens"):
            side.note_prompt_tokens(request.request_id, request.num_prompt_tokens)
        if request.request_id in self._no_reload:  # the retry recomputes, never reloads
            return self.scheduler.get_num_new_matched_tokens(
                request, num_computed_tokens, max_num_new_tokens=0)
        started = time.perf_counter()
        hit, is_async = super().get_num_new_matched_tokens(request, num_computed_tokens)
        direct = self._direct()  # (under the CPU tier, host-memory hits always pay)
        if hit and direct is not None:
            direct.counters.add("lookup_hit_us", int((time.perf_counter() - started) * 1e6))
            if not direct.cache.hit_pays(hit):  # recompute instead
                return self.scheduler.get_num_new_matched_tokens(
                    request, num_computed_tokens, max_num_new_tokens=0)
        return hit, is_async

    def request_finished(self, request, block_ids):
        self._no_reload.discard(request.request_id)
        self._loads_started.pop(request.request_id, None)
        return super().request_finished(request, block_ids)

    def request_finished_all_groups(self, request, block_ids):
        self._no_reload.discard(request.request_id)
        self._loads_started.pop(request.request_id, None)
        return super().request_finished_all_groups(request, block_ids)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        super().update_state_after_alloc(request, blocks, num_external_tokens)
        manager = self._direct()  # under the CPU tier, vLLM counts hits by source itself
        if num_external_tokens and manager is not None:
            self._loads_started[request.request_id] = (time.monotonic(), num_external_tokens)
            manager.counters.add("requests_hit")
            manager.counters.add("tokens_from_disk", num_external_tokens)
            manager.counters.flush()

    # ------------------------------------------------------------------ worker side
    def start_load_kv(self, forward_context, **kwargs) -> None:
        for job_id, entry in self._get_connector_metadata().load_jobs.items():
            if not getattr(entry, "sync", False):  # vLLM 0.33 sync loads are never enabled
                self._load_requests[job_id] = entry.req_id
        super().start_load_kv(forward_context, **kwargs)

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        finished_sending, finished_recving = self.get_finished(finished_req_ids)
        failed: set[str] = set()
        worker = getattr(self.connector_worker, "worker", None)
        take = getattr(worker, "take_failed_loads", None)
        if take is not None:
            failed = {self._load_requests[j] for j in take() if j in self._load_requests}
        finished_recving = set(finished_recving or ())
        done = finished_recving | failed
        if done:  # a request has at most one load in flight
            self._load_requests = {j: r for j, r in self._load_requests.items() if r not in done}
        return KVConnectorTransferResults(
            finished_sending=set(finished_sending or ()),
            finished_recving=finished_recving | failed,
            failed_recving=failed,
        )

    def get_kv_connector_stats(self):
        # worker side: this worker's per-group counters, which vLLM sums over workers and
        # adds to the scheduler side's (the manager's ``get_stats``) on its way to /metrics
        if self.connector_worker is not None:
            return worker_stats(getattr(self.connector_worker, "worker", None))
        return super().get_kv_connector_stats()

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        # the API server process builds the metrics from the config alone: name our spec,
        # so vLLM registers hybridkv's metric definitions there too
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config
        if extra.setdefault("spec_name", SPEC_NAME) == SPEC_NAME:
            extra.setdefault("spec_module_path", SPEC_MODULE)
        return super().build_prom_metrics(vllm_config, metric_types, labelnames,
                                          per_engine_labelvalues)

    # ------------------------------------------------------------------ scheduler side
    def take_events(self):
        # vLLM's offload events carry a chunk's hash and group only: add kind, window, parent
        events = super().take_events()
        chunk_events = getattr(self._hybridkv(), "chunk_events", None)
        return chunk_events.describe(events) if chunk_events is not None else events

    def build_connector_meta(self, scheduler_output):
        now = time.monotonic()
        direct = self._direct()
        if self._last_step is not None and direct is not None:  # the last step ran until now
            direct.cache.observe_step(self._last_step[1], now - self._last_step[0])
        self._last_step = (now, scheduler_output.total_num_scheduled_tokens)
        return super().build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput):
        # the workers' stats of this step say how many stores failed for lack of space:
        # the service evicts (bounded) and backs off if the filesystem stays full
        no_space = no_space_failures(connector_output.kv_connector_stats)
        direct = self._direct() if self.connector_scheduler is not None else None
        if no_space and direct is not None:  # (under the CPU tier the tier's writes tell it)
            direct.cache.store_failed_no_space(no_space)
        failed = connector_output.failed_recving
        if self.connector_scheduler is not None:
            now = time.monotonic()
            for req_id in connector_output.finished_recving or ():
                started = self._loads_started.pop(req_id, None)
                manager = self._direct()
                if started is not None and req_id not in (failed or ()) and manager is not None:
                    manager.cache.observe_load(started[1], now - started[0])
                    manager.counters.add("load_ready_us", int((now - started[0]) * 1e6))
                    manager.counters.add("loads_ready")
        if failed and self.connector_scheduler is not None:
            self._no_reload.update(failed)
            manager = self._direct()
            if manager is not None:
                manager.counters.add("requests_load_failed", len(failed))
                manager.counters.flush()
        super().update_connector_output(connector_output)
