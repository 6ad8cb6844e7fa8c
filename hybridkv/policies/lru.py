"""Group-agnostic LRU over every chunk of every group: what a generic cache does.

A baseline for the simulator (and the fallback a user can select with
``eviction_policy="lru"``). It ignores groups, prefixes and windows: it may
evict the first chunk of a prefix and keep the now-unreachable rest.
"""

from __future__ import annotations

from collections.abc import Collection

from hybridkv.index import ChunkIndex
from hybridkv.policies.base import CapacityPolicy, unpinned

__all__ = ["LRUPolicy", "lru_order"]


def lru_order(index: ChunkIndex, needed: int, protect: Collection[bytes] = ()) -> list[bytes]:
    """Least recently used stored keys until ``needed`` bytes are covered."""
    victims, freed = [], 0
    for entry in sorted(unpinned(index, protect), key=lambda e: e.last_access):
        if freed >= needed:
            break
        victims.append(entry.key)
        freed += entry.size
    return victims


class LRUPolicy(CapacityPolicy):
    name = "lru"

    def victims(self, index: ChunkIndex, needed: int, protect: Collection[bytes] = (), *,
                expendable: int = 0) -> list[bytes]:
        return lru_order(index, needed, protect)
