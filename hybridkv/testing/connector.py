"""``FaultInjectingConnector``: ``HybridKVConnector`` whose stores fail on purpose (tests only).

Select it instead of the production connector::

    {"kv_connector": "FaultInjectingConnector",
     "kv_connector_module_path": "hybridkv.testing.connector",
     "kv_connector_extra_config": {"cache_dir": "...", "testing_faults": "/tmp/rules.json"}}

``testing_faults`` holds inline rules or a rules-file path
(``hybridkv.testing.faults``). The connector points vLLM at
``FaultInjectingSpec``, which hides that key from ``HybridKVConfig`` (it would
be an unknown setting) and gives every store, in the scheduler and in each
worker, a ``FaultyFileIO``. Everything else is the production connector and
spec, unchanged. Without ``testing_faults`` no fault fires.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vllm.config import VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1 import KVConnectorRole
from vllm.v1.kv_cache_interface import KVCacheConfig
from vllm.v1.kv_offload.config import OffloadingConfig

from hybridkv.store.fileio import FileIO
from hybridkv.testing.faults import RULES_KEY, FaultyFileIO, file_io_from_rules
from hybridkv.vllm.connector import HybridKVConnector
from hybridkv.vllm.spec import HybridKVSpec

__all__ = ["FaultInjectingConnector", "FaultInjectingSpec", "transfer_config"]

MODULE = "hybridkv.testing.connector"


class FaultInjectingSpec(HybridKVSpec):
    def __init__(self, config: OffloadingConfig):
        self.fault_rules: Any = config.extra_config.get(RULES_KEY)
        extra = {k: v for k, v in config.extra_config.items() if k != RULES_KEY}
        super().__init__(dataclasses.replace(config, extra_config=extra))

    def _file_io(self) -> FileIO:
        c = self.hkv_config
        if self.fault_rules is None:
            return FaultyFileIO([], durability=c.durability, file_mode=c.file_mode,
                                dir_mode=c.dir_mode)
        return file_io_from_rules(self.fault_rules, c.durability, c.file_mode, c.dir_mode)


class FaultInjectingConnector(HybridKVConnector):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig):
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config
        extra["spec_name"] = FaultInjectingSpec.__name__
        extra["spec_module_path"] = MODULE
        super().__init__(vllm_config, role, kv_cache_config)


def transfer_config(base: dict[str, Any], faults: Any | None) -> dict[str, Any]:
    """``base`` (a hybridkv kv_transfer_config) switched to this connector, with ``faults``."""
    out = dict(base, kv_connector=FaultInjectingConnector.__name__,
               kv_connector_module_path=MODULE)
    extra = dict(base.get("kv_connector_extra_config", {}))
    if faults is not None:
        extra[RULES_KEY] = str(faults) if not isinstance(faults, (list, dict)) else faults
    out["kv_connector_extra_config"] = extra
    return out
