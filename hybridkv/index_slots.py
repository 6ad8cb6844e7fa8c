"""Slots and their columns, under a ``ChunkIndex``: allocation, growth, links, clocks.

``SlotColumns`` owns the storage of the index: the key -> slot dict, one
``array.array`` column per field (``hybridkv.index_view.IndexColumns`` lists
them), the parent / child links (``hybridkv.index_links``), the free-slot list
and the logical clock. ``ChunkIndex`` (``hybridkv.index``) builds the catalog on
it: what stored / pending mean, byte counts, listeners.

Invariants:
- a slot is in use exactly when its flags are not 0 and its key is not None; a
  freed slot is reused (last freed first) before the columns grow;
- every change is in place (growth doubles each column, renumbering rewrites the
  clocks), so ``columns`` stays valid for the life of the object;
- clock ticks are unique and increasing; past 32 bits they are renumbered 1..k in
  the same order (0: never).
"""

from __future__ import annotations

from array import array
from types import MappingProxyType

from hybridkv.chunks import ChunkRecord
from hybridkv.index_clocks import renumbered
from hybridkv.index_links import ParentLinks
from hybridkv.index_view import STORED, IndexColumns
from hybridkv.keys import key_group

__all__ = ["SlotColumns"]

_CLOCK_MAX = 2**32 - 1
_INITIAL = 1024


class SlotColumns:
    """The slots and columns of an index (base of ``ChunkIndex``; see the module docstring)."""

    def __init__(self) -> None:
        self._slot: dict[bytes, int] = {}
        n = _INITIAL
        self._keys: list[bytes | None] = [None] * n
        self._group = array("H", bytes(2 * n))
        self._position = array("i", bytes(4 * n))
        self._size = array("I", bytes(4 * n))
        self._links = ParentLinks(n)
        self._parent = self._links.parent
        self._last_access = array("I", bytes(4 * n))
        self._created = array("I", bytes(4 * n))
        self._mtime = array("q", bytes(8 * n))
        #: rare per-chunk facts, off the columns: loads in flight, when a hit last ended here
        self._pins: dict[int, int] = {}
        self._last_hit: dict[int, int] = {}
        self._flags = bytearray(n)
        self._free = array("i", range(n - 1, -1, -1))  # free slots, next last
        self._groups: set[int] = set()
        self._clock = 0
        #: the columns, read only, for bulk reads (the same object until ``clear``)
        self.columns = IndexColumns(
            keys=self._keys, group=self._group, position=self._position, size=self._size,
            parent=self._parent, last_access=self._last_access, created=self._created,
            mtime_ns=self._mtime, flags=self._flags, pins=MappingProxyType(self._pins),
            last_hit=MappingProxyType(self._last_hit), slot_of=self._slot.get)

    def tick(self) -> int:
        if self._clock >= _CLOCK_MAX:
            self._renumber_clocks()
        self._clock += 1
        return self._clock

    def _fill(self, records: list[ChunkRecord]) -> list[ChunkRecord]:
        """Into empty slots: the first record of each key, stored, in order, then linked
        (one pass over the columns each); returns the records taken."""
        first = self._slot  # empty: filled in place (``columns.slot_of`` reads it)
        unique = []
        for r in records:  # the first record of a key wins, as ``add`` does
            if r.key not in first:
                first[r.key] = len(unique)
                unique.append(r)
        n = len(unique)
        while len(self._flags) < n:
            self._grow()
        self._keys[:n] = [r.key for r in unique]
        self._group[:n] = array("H", [r.group for r in unique])
        self._position[:n] = array("i", [r.position for r in unique])
        self._size[:n] = array("I", [r.size for r in unique])
        self._mtime[:n] = array("q", [r.mtime_ns for r in unique])
        ticks = array("I", range(self._clock + 1, self._clock + n + 1))
        self._last_access[:n] = ticks
        self._created[:n] = ticks
        self._clock += n
        self._flags[:n] = bytes([STORED]) * n
        self._groups.update(r.group for r in unique)
        capacity = len(self._flags)
        self._free = array("i", range(capacity - 1, n - 1, -1))
        slot_of, links = first.get, self._links
        for c in range(n):  # children in slot (= load) order
            pk = unique[c].parent
            if pk is None:
                continue
            p = slot_of(pk)
            if p is None:
                links.wait(c, pk)
            else:
                links.append(p, c)
        return unique

    def _new_slot(self, key: bytes, *, position: int, size: int, parent: bytes | None,
                  flags: int) -> int:
        if not self._free:
            self._grow()
        slot = self._free.pop()
        group = key_group(key)
        self._slot[key] = slot
        self._keys[slot] = key
        self._group[slot] = group
        self._groups.add(group)
        self._position[slot] = position
        self._size[slot] = size
        self._flags[slot] = flags
        self._last_access[slot] = self._created[slot] = 0
        self._mtime[slot] = 0
        self._link(slot, parent)
        self._links.adopt(slot, key)  # children that were waiting for this key
        return slot

    def _free_slot(self, slot: int) -> None:
        key = self._keys[slot]
        self._links.unlink(slot)
        self._links.orphan_children(slot, key)  # type: ignore[arg-type]
        del self._slot[key]  # type: ignore[arg-type]
        self._keys[slot] = None
        self._flags[slot] = 0
        self._pins.pop(slot, None)
        self._last_hit.pop(slot, None)
        self._free.append(slot)

    def _link(self, slot: int, parent: bytes | None) -> None:
        self._links.link(slot, parent, None if parent is None else self._slot.get(parent))

    def _grow(self) -> None:
        """Double every column, in place (``columns`` stays valid)."""
        n = len(self._flags)
        self._keys.extend([None] * n)
        for col in (self._group, self._position, self._size, self._last_access, self._created,
                    self._mtime):
            col.frombytes(bytes(col.itemsize * n))
        self._links.grow(n)
        self._flags.extend(bytes(n))
        self._free.extend(range(2 * n - 1, n - 1, -1))

    def _renumber_clocks(self) -> None:
        """Compress the logical clocks to 1..k, keeping their order (and 0 = never), in place."""
        access, created, hits, self._clock = renumbered(self._last_access, self._created,
                                                        self._last_hit)
        self._last_access[:] = access
        self._created[:] = created
        self._last_hit.update(zip(list(self._last_hit), hits))
