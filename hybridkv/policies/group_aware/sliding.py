"""Sliding-window groups: a hit at p needs only the chunks covering the window before p.

Admission: a chunk inside the window of one of the request's resume points
is admitted; a chunk no hit point on the hit grid can ever include is
rejected; any other chunk is ``SPARE`` (free space, or the place of a dead or
expendable spare chunk; see ``group_aware``).
Eviction (in ``group_aware``): a chunk that no servable hit point's window
needs is dead and goes first.
"""

from __future__ import annotations

from hybridkv.groups import GroupSpec
from hybridkv.hit_rule import load_window_chunks
from hybridkv.index import ChunkIndex
from hybridkv.policies.base import Admission, Candidate

__all__ = ["SlidingWindowRule"]


def _window_start(group: GroupSpec, hit: int) -> int:
    """Tokens before the first chunk a hit at ``hit`` loads."""
    chunks = load_window_chunks(group, hit) or 1
    return (-(-hit // group.chunk_tokens) - chunks) * group.chunk_tokens


class SlidingWindowRule:
    def admit(self, group: GroupSpec, candidate: Candidate, resume_points: set[int],
              hit_grid: int) -> Admission:
        q = candidate.position
        if any(_window_start(group, h) < q <= -(-h // group.chunk_tokens) * group.chunk_tokens
               for h in resume_points):
            return Admission.ADMIT
        # the first grid point at or after the chunk's end: if its window misses the chunk,
        # so do all later ones
        first = -(-q // hit_grid) * hit_grid
        if _window_start(group, first) >= q:
            return Admission.REJECT
        return Admission.SPARE

    @staticmethod
    def needs(index: ChunkIndex, group: GroupSpec, key: bytes, hit: int) -> list[bytes] | None:
        """The keys a hit at ``hit`` loads from this group (``key`` is the chunk ending there)."""
        keys: list[bytes] = []
        k: bytes | None = key
        for _ in range(load_window_chunks(group, hit) or 1):
            entry = index.get_any(k) if k is not None else None
            if entry is None:
                return None
            keys.append(k)
            if entry.position <= group.chunk_tokens:
                break
            k = entry.parent
        return keys
