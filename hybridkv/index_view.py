"""How other modules read a ``ChunkIndex``: flag bits, listener protocol, views.

- ``IndexColumns`` (``index.columns``): the index's columns, read only, for hot
  loops (a policy binds them to locals once per call). Each column is indexed by
  slot and read through: it is the index's own array, so it shows every change and
  stays valid while the index grows (columns grow in place). Only ``clear()``
  replaces the columns: fetch ``index.columns`` again after it (listeners hear
  ``on_clear``). Writing through a column breaks the index's invariants.
- ``ChunkEntry``: a light view of one slot (valid until that chunk leaves the index).
- ``IndexListener``: what a subscriber hears, synchronously, on every change.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from hybridkv.index import ChunkIndex

__all__ = ["STORED", "PENDING", "SPARE", "NONE", "IndexColumns", "ChunkEntry", "IndexListener"]

#: flag bits of a slot (``IndexColumns.flags``, ``ChunkIndex.flags_of``); 0: a free slot
STORED = 1
PENDING = 2
SPARE = 4
#: "no slot" (``IndexColumns.parent`` of a chunk whose parent is not present)
NONE = -1


class IndexListener(Protocol):
    def on_present(self, slot: int) -> None: ...
    def on_stored(self, slot: int, completed: bool = False, resized: bool = False) -> None: ...
    def on_absent(self, slot: int) -> None: ...
    def on_touch(self, slot: int, was_spare: bool) -> None: ...
    def on_hit(self, slot: int) -> None: ...


@dataclass(frozen=True, slots=True)
class IndexColumns:
    """The columns of an index, by slot (read only; see the module docstring).

    A slot is in use exactly when ``flags[slot] != 0`` (equivalently ``keys[slot]``
    is not None); the other columns of a free slot hold stale values.
    """

    keys: Sequence[bytes | None]
    group: array  # "H"
    position: array  # "i": end token of the chunk within its prefix
    size: array  # "I": bytes (a pending chunk: its reservation)
    parent: array  # "i": the parent's slot, NONE when it is not present
    last_access: array  # "I": logical clock
    created: array  # "I": logical clock
    mtime_ns: array  # "q"
    flags: bytearray  # STORED | PENDING | SPARE bits
    pins: Mapping[int, int]  # slot -> loads in flight (absent: 0)
    last_hit: Mapping[int, int]  # slot -> clock of the last hit that ended there (absent: 0)
    slot_of: Callable[[bytes], int | None]  # key -> slot of a stored or pending chunk


class ChunkEntry:
    """A read-only view of one slot (valid until that chunk leaves the index)."""

    __slots__ = ("_index", "_cols", "slot", "key")

    def __init__(self, index: ChunkIndex, slot: int, key: bytes):
        self._index = index
        self._cols = index.columns
        self.slot = slot
        self.key = key

    group = property(lambda self: self._cols.group[self.slot])
    position = property(lambda self: self._cols.position[self.slot])
    size = property(lambda self: self._cols.size[self.slot])
    last_access = property(lambda self: self._cols.last_access[self.slot])
    created = property(lambda self: self._cols.created[self.slot])
    last_hit = property(lambda self: self._cols.last_hit.get(self.slot, 0))
    pins = property(lambda self: self._cols.pins.get(self.slot, 0))
    mtime_ns = property(lambda self: self._cols.mtime_ns[self.slot])
    spare = property(lambda self: bool(self._cols.flags[self.slot] & SPARE))
    stored = property(lambda self: bool(self._cols.flags[self.slot] & STORED))

    @property
    def parent(self) -> bytes | None:
        return self._index.parent_key(self.slot)

    @property
    def children(self) -> set[bytes]:
        cols = self._cols
        return {cols.keys[c] for c in self._index.child_slots(self.slot)  # type: ignore[misc]
                if cols.flags[c] & STORED}

    def __repr__(self) -> str:
        return (f"ChunkEntry(key={self.key.hex()}, group={self.group}, position={self.position}, "
                f"size={self.size}, stored={self.stored}, spare={self.spare})")
