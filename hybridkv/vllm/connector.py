"""``HybridKVConnector``: vLLM's ``OffloadingConnector`` with hybridkv's spec plugged in.

It fills in ``spec_name`` / ``spec_module_path`` so users name only the
connector, hands vLLM's ``KVCacheConfig`` to the spec (which needs each
group's kind and window), and counts the tokens each request gets from disk.
It inherits ``SupportsHMA``, so vLLM keeps the hybrid memory allocator on.

Failed loads (worker side) reach vLLM as ``failed_recving`` request ids, the
path vLLM provides for models with several KV cache groups; vLLM's own
offloading worker cannot report them (it asserts every job succeeded). vLLM
then recomputes the request from scratch (``kv_load_failure_policy=
"recompute"``) or ends it with an error (``"fail"``). On the scheduler side a
request whose load failed gets ``max_load_tokens = 0``: its retry recomputes
instead of loading the same (possibly still unreadable) file again, so a
persistent read error cannot loop.
"""

from __future__ import annotations

from vllm.config import VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1 import KVConnectorRole
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults
from vllm.distributed.kv_transfer.kv_connector.v1.offloading_connector import (
    OffloadingConnector,
)
from vllm.v1.kv_cache_interface import KVCacheConfig
from vllm.v1.outputs import KVConnectorOutput

from hybridkv.vllm.spec import kv_cache_config_context

__all__ = ["HybridKVConnector"]

SPEC_NAME = "HybridKVSpec"
SPEC_MODULE = "hybridkv.vllm.spec"


class HybridKVConnector(OffloadingConnector):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig):
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config
        extra.setdefault("spec_name", SPEC_NAME)
        extra.setdefault("spec_module_path", SPEC_MODULE)
        hidden = vllm_config.model_config.get_hidden_size() if vllm_config.model_config else None
        with kv_cache_config_context(kv_cache_config, hidden_size=hidden):
            super().__init__(vllm_config, role, kv_cache_config)

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        # the policy's likely hit points depend on the prompt length (chunk-aligned repeats)
        self.scheduler.manager.note_prompt_tokens(request.request_id, request.num_prompt_tokens)
        return super().get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        super().update_state_after_alloc(request, blocks, num_external_tokens)
        if num_external_tokens:
            manager = self.scheduler.manager
            manager.counters.add("requests_hit")
            manager.counters.add("tokens_from_disk", num_external_tokens)
            manager.counters.flush()

    # ------------------------------------------------------------------ worker side
    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        worker_side = self.connector_worker
        load_jobs = dict(getattr(worker_side, "_load_jobs", {}) or {})  # job id -> req id
        finished_sending, finished_recving = self.get_finished(finished_req_ids)
        failed: set[str] = set()
        worker = getattr(worker_side, "worker", None)
        take = getattr(worker, "take_failed_loads", None)
        if take is not None:
            failed = {load_jobs[j] for j in take() if j in load_jobs}
        finished_recving = set(finished_recving or ())
        return KVConnectorTransferResults(
            finished_sending=set(finished_sending or ()),
            finished_recving=finished_recving | failed,
            failed_recving=failed,
        )

    # ------------------------------------------------------------------ scheduler side
    def update_connector_output(self, connector_output: KVConnectorOutput):
        failed = connector_output.failed_recving
        if failed and self.connector_scheduler is not None:
            statuses = getattr(self.connector_scheduler, "_req_status", {})
            for req_id in failed:
                status = statuses.get(req_id)
                if status is not None:
                    status.max_load_tokens = 0  # the retry recomputes, never reloads
            manager = self.scheduler.manager
            manager.counters.add("requests_load_failed", len(failed))
            manager.counters.flush()
        super().update_connector_output(connector_output)
