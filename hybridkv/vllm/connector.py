"""``HybridKVConnector``: vLLM's ``OffloadingConnector`` with hybridkv's spec plugged in.

It fills in ``spec_name`` / ``spec_module_path`` so users name only the
connector, hands vLLM's ``KVCacheConfig`` to the spec (which needs each
group's kind and window), and counts the tokens each request gets from disk.
It inherits ``SupportsHMA``, so vLLM keeps the hybrid memory allocator on.
"""

from __future__ import annotations

from vllm.config import VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1 import KVConnectorRole
from vllm.distributed.kv_transfer.kv_connector.v1.offloading_connector import (
    OffloadingConnector,
)
from vllm.v1.kv_cache_interface import KVCacheConfig

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
        with kv_cache_config_context(kv_cache_config):
            super().__init__(vllm_config, role, kv_cache_config)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        super().update_state_after_alloc(request, blocks, num_external_tokens)
        if num_external_tokens:
            manager = self.scheduler.manager
            manager.counters.add("requests_hit")
            manager.counters.add("tokens_from_disk", num_external_tokens)
            manager.counters.flush()
