"""A hit point, as the policy keeps it, and the bounds of its incremental upkeep.

A *hit point* is a spine slot (a chunk of the first full-attention group) where
every group can serve a hit (``policy``'s vocabulary). ``Point`` holds what the
other groups load for a hit there and the values its eviction order uses.

Invariants:
- ``needs`` are present slots (stored or pending), none of the spine group;
- ``checkpoint`` is True exactly when none of ``needs`` is ``SPARE``;
- a checkpoint's ``gap`` is FAR and never counted; a non-checkpoint's ``density``
  is 0.0 (it saves FLOPs only by chance: it stays by recency alone).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Point", "FAR", "SHARED", "WALK_LIMIT"]

#: the gap of a spare chunk with no checkpoint past it
FAR = 1 << 62
#: a chunk shared by at least this many hit points: a change in how many share it moves
#: each one's density by under 1/SHARED, so they are not all refreshed for it
SHARED = 64
#: nodes a gap search or a refresh walk below one point visits at most
WALK_LIMIT = 256


@dataclass(slots=True)
class Point:
    needs: tuple[int, ...]  # slots other groups load for a hit here
    checkpoint: bool  # needs no spare chunk
    density: float = 0.0  # FLOPs saved per byte charged (0 for a non-checkpoint)
    recency: tuple[int, int, int] = (0, 0, 0)  # (max(last_hit, created), position, slot)
    gap: int = FAR  # for a non-checkpoint: distance to the checkpoint below (FAR: none)
    gap_counted: bool = False  # its gap is in its needs' smallest-gap counts
