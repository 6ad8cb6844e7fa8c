"""hybridkv's vLLM adapter: the only package of hybridkv that imports vLLM.

Turn hybridkv on with ONE kv_transfer_config (also accepted verbatim by
``vllm serve --kv-transfer-config '<json>'``)::

    {"kv_connector": "HybridKVConnector",
     "kv_connector_module_path": "hybridkv.vllm.connector",
     "kv_role": "kv_both",
     "kv_load_failure_policy": "recompute",
     "kv_connector_extra_config": {"cache_dir": "/mnt/kv"}}

``kv_transfer_config(cache_dir, ...)`` builds that dict.
"""

from __future__ import annotations

from typing import Any

__all__ = ["kv_transfer_config"]


def kv_transfer_config(cache_dir: str, **settings: Any) -> dict[str, Any]:
    """The documented kv_transfer_config; ``settings`` go to kv_connector_extra_config."""
    return {
        "kv_connector": "HybridKVConnector",
        "kv_connector_module_path": "hybridkv.vllm.connector",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"cache_dir": str(cache_dir), **settings},
    }
