"""Group-agnostic LRU over every chunk of every group: what a generic cache does.

A baseline for the simulator (and the fallback a user can select with
``eviction_policy="lru"``). It ignores groups, prefixes and windows: it may
evict the first chunk of a prefix and keep the now-unreachable rest.
"""

from __future__ import annotations

from collections.abc import Collection

from hybridkv.index import ChunkIndex
from hybridkv.policies.base import CapacityPolicy

__all__ = ["LRUPolicy", "lru_order"]


def lru_order(index: ChunkIndex, needed: int, protect: Collection[bytes] = ()) -> list[bytes]:
    """Least recently used stored, unpinned keys not in ``protect`` until ``needed`` bytes."""
    victims: list[bytes] = []
    if needed <= 0:
        return victims
    freed = 0
    cols = index.columns
    keys, pins, size = cols.keys, cols.pins, cols.size
    for slot in index.lru_slots():
        if freed >= needed:
            break
        key = keys[slot]
        if pins.get(slot) or key in protect:
            continue
        victims.append(key)  # type: ignore[arg-type]
        freed += size[slot]
    return victims


class LRUPolicy(CapacityPolicy):
    name = "lru"

    def victims(self, index: ChunkIndex, needed: int, protect: Collection[bytes] = (), *,
                expendable: int = 0) -> list[bytes]:
        return lru_order(index, needed, protect)
