"""hybridkv's vLLM adapter: the only package of hybridkv that imports vLLM.

Turn hybridkv on with ONE kv_transfer_config (also accepted verbatim by
``vllm serve --kv-transfer-config '<json>'``)::

    {"kv_connector": "HybridKVConnector",
     "kv_connector_module_path": "hybridkv.vllm.connector",
     "kv_role": "kv_both",
     "kv_load_failure_policy": "recompute",
     "kv_connector_extra_config": {"cache_dir": "/mnt/kv"}}

``kv_transfer_config(cache_dir, ...)`` builds that dict.

On a GPU node, hybridkv can instead sit under vLLM's CPU tier as a secondary tier
(hits from host memory first, then from hybridkv's disk)::

    {"kv_connector": "HybridKVConnector",
     "kv_connector_module_path": "hybridkv.vllm.connector",
     "kv_role": "kv_both",
     "kv_connector_extra_config": {
         "spec_name": "TieringOffloadingSpec", "cpu_bytes_to_use": 68719476736,
         "secondary_tiers": [{"type": "HybridKVTier", "module_path": "hybridkv.vllm.tier",
                              "cache_dir": "/mnt/kv", "disk_budget": "2TiB"}]}}

``tier_transfer_config(cache_dir, cpu_bytes_to_use, ...)`` builds that one.
"""

from __future__ import annotations

from typing import Any

__all__ = ["kv_transfer_config", "tier_transfer_config"]


def kv_transfer_config(cache_dir: str, **settings: Any) -> dict[str, Any]:
    """The documented kv_transfer_config; ``settings`` go to kv_connector_extra_config."""
    return {
        "kv_connector": "HybridKVConnector",
        "kv_connector_module_path": "hybridkv.vllm.connector",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"cache_dir": str(cache_dir), **settings},
    }


def tier_transfer_config(cache_dir: str, cpu_bytes_to_use: int, *,
                         tiering: dict[str, Any] | None = None,
                         **settings: Any) -> dict[str, Any]:
    """hybridkv as the secondary tier under vLLM's CPU tier of ``cpu_bytes_to_use`` bytes.

    ``settings`` are hybridkv's (the direct mode's names) and go to the tier;
    ``tiering``: more of vLLM's tiering keys (``eviction_policy``, ``block_size``,
    ``backpressure``, ...) for ``kv_connector_extra_config``.
    """
    if not isinstance(cpu_bytes_to_use, int) or isinstance(cpu_bytes_to_use, bool) \
            or cpu_bytes_to_use <= 0:
        raise ValueError(f"cpu_bytes_to_use: expected a positive number of bytes, "
                         f"got {cpu_bytes_to_use!r}")
    tier = {"type": "HybridKVTier", "module_path": "hybridkv.vllm.tier",
            "cache_dir": str(cache_dir), **settings}
    return {
        "kv_connector": "HybridKVConnector",
        "kv_connector_module_path": "hybridkv.vllm.connector",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"spec_name": "TieringOffloadingSpec",
                                      "cpu_bytes_to_use": cpu_bytes_to_use,
                                      **(tiering or {}), "secondary_tiers": [tier]},
    }
