"""No eviction on the write path, plus a cleaner that deletes LRU files at a high watermark.

This is what the llm-d filesystem setup does: the connector never evicts; a
separate cleaner deletes the least recently used files once usage passes
85% of the budget, down to 70%. A store that does not fit is refused (the
disk is full). A baseline for the simulator.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from hybridkv.index import ChunkIndex
from hybridkv.policies.base import Admission, Candidate, CapacityPolicy, RequestView
from hybridkv.policies.lru import lru_order

__all__ = ["WatermarkPolicy"]


class WatermarkPolicy(CapacityPolicy):
    name = "watermark"

    def __init__(self, high: float = 0.85, low: float = 0.70):
        if not 0 < low < high <= 1:
            raise ValueError("watermarks need 0 < low < high <= 1")
        self.high, self.low = high, low

    def admit(self, batch: Sequence[Candidate], request: RequestView,
              index: ChunkIndex) -> list[Admission]:
        return [Admission.SPARE] * len(batch)  # free space only: the writer never evicts

    def victims(self, index: ChunkIndex, needed: int, protect: Collection[bytes] = (), *,
                expendable: int = 0) -> list[bytes]:
        return []

    def cleanup(self, index: ChunkIndex, budget: int,
                protect: Collection[bytes] = ()) -> list[bytes]:
        if index.bytes_used <= self.high * budget:
            return []
        return lru_order(index, index.bytes_used - int(self.low * budget), protect)
