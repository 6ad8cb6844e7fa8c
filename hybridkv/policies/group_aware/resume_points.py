"""Resume points of a request: where a later request will probably resume.

A hit can only end where every group can serve it (a *hit point*). Windows and
states are worth storing only around the positions where later requests are
likely to resume (Marconi's checkpoints); admission keeps them there:

- the end of the request (the last complete chunk: a later turn or a retry
  resumes there; with an exactly chunk-aligned prompt also the chunk before,
  where a repeat of the same prompt resumes, its last token being recomputed);
- every ``interval`` chunks, if configured;
- branch points: where this request leaves the prefixes already stored, so a
  third request down either branch resumes at the fork.

Invariant: positions are on the chunk grid of the spine (the layout's first
full-attention group), > 0 and at most the request's last complete spine chunk.
"""

from __future__ import annotations

from hybridkv.groups import GroupSpec
from hybridkv.index import ChunkIndex
from hybridkv.keys import key_group
from hybridkv.policies.base import RequestView

__all__ = ["resume_points"]


def resume_points(spine: GroupSpec, request: RequestView, index: ChunkIndex,
                  interval: int = 0) -> set[int]:
    """Positions (tokens) where a later request is likely to resume."""
    c = spine.chunk_tokens
    chain = sorted((pos, key) for key, pos in request.positions.items()
                   if key_group(key) == spine.index)
    if not chain:
        return set()
    end = chain[-1][0]
    points = {end}
    if request.num_tokens is not None and request.num_tokens % c == 0 and end == request.num_tokens:
        points.add(end - c)
    if interval > 0:
        points.update(range(interval * c, end + 1, interval * c))
    previous = None
    for pos, key in chain:
        if key not in index and not index.is_pending(key):
            if previous is not None and previous in index:
                points.add(pos - c)
            break
        previous = key
    points.discard(0)
    return points
