"""Full-attention groups: every chunk from the start of the prefix is needed.

Admission: every offered chunk (it is the spine every hit depends on).
Eviction (in ``group_aware``): only the deepest chunks of a prefix go, and
an evicted chunk takes every chunk that depended on it along (orphans).
"""

from __future__ import annotations

from hybridkv.groups import GroupSpec
from hybridkv.index import ChunkIndex
from hybridkv.policies.base import Admission, Candidate

__all__ = ["FullAttentionRule"]


class FullAttentionRule:
    def admit(self, group: GroupSpec, candidate: Candidate, resume_points: set[int],
              hit_grid: int) -> Admission:
        return Admission.ADMIT

    @staticmethod
    def rooted(index: ChunkIndex, key: bytes, group: GroupSpec, memo: dict[bytes, bool]) -> bool:
        """Is every chunk from the start of the prefix up to ``key`` stored (or being stored)?"""
        chain: list[bytes] = []
        k: bytes | None = key
        result = False
        while k is not None:
            if k in memo:
                result = memo[k]
                break
            entry = index.get_any(k)
            if entry is None:
                break
            chain.append(k)
            if entry.position <= group.chunk_tokens:
                result = True
                break
            k = entry.parent
        for ck in chain:
            memo[ck] = result
        return result

    @staticmethod
    def chain(index: ChunkIndex, key: bytes) -> list[bytes]:
        """``key`` and its stored ancestors, deepest first."""
        out = []
        k: bytes | None = key
        while k is not None and (entry := index.get_any(k)) is not None:
            out.append(k)
            k = entry.parent
        return out
