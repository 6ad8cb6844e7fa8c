"""What the manager hands the worker for one load or store: chunk keys in order.

Keys are listed group by group, each group in chunk order, exactly as vLLM's
scheduler lists the blocks of the matching ``GPULoadStoreSpec``.
"""

from __future__ import annotations

from vllm.v1.kv_offload.base import LoadStoreSpec

__all__ = ["ChunkLoadSpec", "ChunkStoreSpec"]


class ChunkLoadSpec(LoadStoreSpec):
    def __init__(self, keys: list[bytes]):
        self.keys = keys

    def __repr__(self) -> str:
        return f"ChunkLoadSpec({len(self.keys)} chunks)"


class ChunkStoreSpec(LoadStoreSpec):
    """Keys to write, with each chunk's end position and the key it extends."""

    def __init__(self, keys: list[bytes], positions: list[int], parents: list[bytes | None]):
        assert len(keys) == len(positions) == len(parents)
        self.keys = keys
        self.positions = positions
        self.parents = parents

    def __repr__(self) -> str:
        return f"ChunkStoreSpec({len(self.keys)} chunks)"
