"""State groups (Mamba, gated delta net, linear attention): one state, exactly at the hit.

Admission: states at the request's resume points (end of request, every
k chunks, branch points); any other state is ``SPARE`` (free space, or the place
of a dead or expendable spare chunk, see ``group_aware``): it helps only a
request that resumes at exactly that position.
Eviction (in ``group_aware``): a state whose prefix is gone is dead; a live
state goes by Marconi's utility, recency plus prefill FLOPs saved per byte.
"""

from __future__ import annotations

from hybridkv.groups import GroupSpec
from hybridkv.index import ChunkIndex
from hybridkv.policies.base import Admission, Candidate

__all__ = ["StateRule"]


class StateRule:
    def admit(self, group: GroupSpec, candidate: Candidate, resume_points: set[int],
              hit_grid: int) -> Admission:
        return Admission.ADMIT if candidate.position in resume_points else Admission.SPARE

    @staticmethod
    def needs(index: ChunkIndex, group: GroupSpec, key: bytes, hit: int) -> list[bytes] | None:
        return [key] if index.get_any(key) is not None else None
