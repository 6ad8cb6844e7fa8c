"""The logical clocks of a ``ChunkIndex``: recency orders over them, and renumbering.

Clocks (``last_access``, ``created``, ``last_hit``) are unique increasing ticks of
one counter, 0 meaning never. Everything here reads the index's columns
(``IndexColumns``) and writes nothing: ``renumbered`` returns new values the
index stores in place.

Invariants: ``lru_slots`` and ``by_recency`` yield least recently used first,
ties (none among stored chunks: ticks are unique) in slot order; ``renumbered``
keeps the order of every clock value and maps 0 to 0.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from hybridkv.index_view import STORED, IndexColumns

__all__ = ["lru_slots", "by_recency", "renumbered"]


def lru_slots(columns: IndexColumns) -> Iterator[int]:
    """Slots of stored chunks, least recently used first (sorted lazily, in blocks)."""
    n = len(columns.flags)
    flags = np.frombuffer(columns.flags, dtype=np.uint8)[:n]
    slots = np.flatnonzero(flags & STORED)
    if not len(slots):
        return
    access = np.frombuffer(columns.last_access, dtype=np.uint32)[slots]
    del flags
    block = 256
    start = 0
    while start < len(slots):
        # the next ``block`` smallest, without sorting all of them
        k = min(block, len(slots) - start)
        rest_access = access[start:]
        if k < len(rest_access):
            part = np.argpartition(rest_access, k - 1)
            rest = slots[start:][part]
            rest_access = rest_access[part]
            slots[start:] = rest
            access[start:] = rest_access
        head = np.argsort(access[start:start + k], kind="stable")
        slots[start:start + k] = slots[start:start + k][head]
        access[start:start + k] = access[start:start + k][head]
        for s in slots[start:start + k].tolist():
            yield s
        start += k
        block *= 4


def by_recency(columns: IndexColumns, slots: Sequence[int]) -> list[int]:
    """``slots`` least recently used first (a stable sort by ``last_access``)."""
    access = np.frombuffer(columns.last_access, dtype=np.uint32)
    order = np.asarray(slots, dtype=np.int64)
    order = order[np.argsort(access[order], kind="stable")] if len(slots) else order
    del access
    return order.tolist()


def renumbered(last_access: array, created: array, last_hit: Mapping[int, int]
               ) -> tuple[array, array, list[int], int]:
    """Clocks compressed to 1..k in the same order (0 stays 0): new ``last_access``,
    ``created``, the ``last_hit`` values (in the mapping's order) and the largest."""
    cols = [np.frombuffer(c, dtype=np.uint32) for c in (last_access, created)]
    hits = np.fromiter(last_hit.values(), dtype=np.uint32, count=len(last_hit))
    values, inverse = np.unique(np.concatenate([*cols, hits]), return_inverse=True)
    ranks = np.arange(len(values), dtype=np.uint32) + (0 if values[0] == 0 else 1)
    new = ranks[inverse]
    n = len(cols[0])
    del cols
    return (array("I", new[:n].tobytes()), array("I", new[n:2 * n].tobytes()),
            new[2 * n:].tolist(), int(new.max()))
