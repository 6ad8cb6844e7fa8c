"""The in-memory catalog of stored chunks: compact columns, one key -> slot table.

Layout (struct of arrays, ``hybridkv.index_slots``): every chunk the index knows,
stored or being stored (*pending*), owns a *slot*; a dict maps its key to the slot
and each field is one ``array.array`` column indexed by slot (group, position,
size, parent slot, two logical clocks, file mtime, flags; parent / child links:
``hybridkv.index_links``; clocks: ``hybridkv.index_clocks``); facts few chunks
have (pins of loads in flight, when a hit last ended there) live in small dicts.
Columns grow by doubling and freed slots are reused, so a million chunks cost one
key object, one dict entry, one int and ~45 bytes of columns each
(``benchmarks/index_scale.py`` measures it).

Reading: by key (``in``, ``is_stored``, ``get``), by slot (``group_of``,
``size_of``, ...), or in bulk through ``columns`` (``hybridkv.index_view``), the
read-only columns policies bind to locals in their hot loops.

Invariants:
- A key is stored (``in`` the index) only once its file is complete on disk (added
  on store completion or found by a scan); *pending* keys are being written.
- ``bytes_used`` is the sum of ``size`` over stored entries plus pending reservations.
- A pinned entry (being loaded) is never removed by eviction (callers check ``pins``).
- ``parent`` links a chunk to the chunk of the SAME group it extends, whenever that
  chunk is known (stored or pending); children of an absent parent wait for it
  and are linked when it arrives. ``children`` / ``descendants``
  report stored chunks only. Chunks of different groups at one prefix position share
  a hash (``companions``). All relations derive from ``parent``, which every chunk
  header records, so they survive a restart.
- Logical clocks (``last_access``, ``created``, ``last_hit``) are unique, increasing
  ticks; when they would overflow 32 bits they are renumbered (in place), keeping
  their order.
- Columns change in place, so ``columns`` stays valid until ``clear()``.
- Listeners (``subscribe``) hear every change synchronously: a chunk became known
  (``on_present``), stored (``on_stored``; ``completed``: a reservation of the same
  chunk, ``resized``: with another size), is about to be forgotten
  (``on_absent``, while its slot is still valid), was touched or hit.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from hybridkv.chunks import ChunkRecord
from hybridkv.index_clocks import by_recency, lru_slots
from hybridkv.index_slots import SlotColumns
from hybridkv.index_view import PENDING, SPARE, STORED, ChunkEntry, IndexColumns, IndexListener
from hybridkv.keys import key_group, key_hash, make_key

__all__ = ["ChunkEntry", "ChunkIndex", "IndexColumns", "IndexListener", "STORED", "PENDING",
           "SPARE"]


class ChunkIndex(SlotColumns):
    def __init__(self) -> None:
        super().__init__()
        self._listeners: list[IndexListener] = []
        self._stored = 0
        self.bytes_stored = 0
        self.bytes_pending = 0

    # ---------------------------------------------------------------- queries
    def __contains__(self, key: bytes) -> bool:
        slot = self._slot.get(key)
        return slot is not None and self._flags[slot] & STORED != 0

    def is_stored(self, key: bytes) -> bool:
        """Is ``key``'s file complete on disk (the lookup path: one dict get, one flag test)?"""
        slot = self._slot.get(key)
        return slot is not None and self._flags[slot] & STORED != 0

    def __len__(self) -> int:
        return self._stored

    def __iter__(self) -> Iterator[ChunkEntry]:
        flags, keys = self._flags, self._keys
        for key, slot in list(self._slot.items()):
            if flags[slot] & STORED and keys[slot] is key:  # still the same chunk
                yield ChunkEntry(self, slot, key)

    def get(self, key: bytes) -> ChunkEntry | None:
        slot = self._slot.get(key)
        if slot is None or not self._flags[slot] & STORED:
            return None
        return ChunkEntry(self, slot, key)

    def get_any(self, key: bytes) -> ChunkEntry | None:
        """The entry, stored or being stored."""
        slot = self._slot.get(key)
        return None if slot is None else ChunkEntry(self, slot, key)

    def slot_of(self, key: bytes) -> int | None:
        """The slot of a stored or pending key (None if unknown)."""
        return self._slot.get(key)

    def key_of(self, slot: int) -> bytes:
        return self._keys[slot]  # type: ignore[return-value]

    def group_of(self, slot: int) -> int:
        return self._group[slot]

    def position_of(self, slot: int) -> int:
        return self._position[slot]

    def size_of(self, slot: int) -> int:
        """Bytes of the chunk (of a pending one: its reservation)."""
        return self._size[slot]

    def parent_of(self, slot: int) -> int:
        """The slot of the present parent, or -1 (none, or not present)."""
        return self._parent[slot]

    def flags_of(self, slot: int) -> int:
        """``STORED`` / ``PENDING`` / ``SPARE`` bits (0: a free slot)."""
        return self._flags[slot]

    def pins_of(self, slot: int) -> int:
        """Loads in flight of the chunk at ``slot``."""
        return self._pins.get(slot, 0)

    def is_stored_slot(self, slot: int) -> bool:
        return self._flags[slot] & STORED != 0

    def is_pending(self, key: bytes) -> bool:
        slot = self._slot.get(key)
        return slot is not None and self._flags[slot] & PENDING != 0

    def pending(self) -> Iterator[ChunkEntry]:
        flags = self._flags
        for key, slot in list(self._slot.items()):
            if flags[slot] & PENDING:
                yield ChunkEntry(self, slot, key)

    def present_slots(self) -> list[int]:
        """Slots of every stored or pending chunk, in the order their keys became known."""
        return list(self._slot.values())

    def parent_key(self, slot: int) -> bytes | None:
        return self._links.parent_key(slot, self._keys)

    def child_slots(self, slot: int) -> Iterator[int]:
        """Slots of the present (stored or pending) chunks that extend ``slot``, oldest first."""
        return self._links.children(slot)

    def companions(self, key: bytes) -> dict[int, bytes]:
        """group -> key of every stored chunk at the same prefix position as ``key``."""
        h = key_hash(key)
        out = {}
        for g in self._groups:
            k = key if g == key_group(key) else make_key(h, g)
            slot = self._slot.get(k)
            if slot is not None and self._flags[slot] & STORED:
                out[g] = self._keys[slot]
        return out

    def descendants(self, key: bytes) -> list[bytes]:
        """Stored chunks of ``key``'s group that extend it, at any depth."""
        slot = self._slot.get(key)
        if slot is None or not self._flags[slot] & STORED:
            return []
        out: list[bytes] = []
        flags, keys, children = self._flags, self._keys, self._links.children
        stack = [c for c in children(slot) if flags[c] & STORED]
        while stack:
            s = stack.pop()
            out.append(keys[s])  # type: ignore[arg-type]
            stack.extend(c for c in children(s) if flags[c] & STORED)
        return out

    @property
    def bytes_used(self) -> int:
        return self.bytes_stored + self.bytes_pending

    def subscribe(self, listener: IndexListener) -> None:
        """Hear every change from now on (a policy's incremental state)."""
        self._listeners.append(listener)

    def unsubscribe(self, listener: IndexListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)
    # ---------------------------------------------------------------- updates
    def reserve(self, key: bytes, size: int, *, position: int = 0,
                parent: bytes | None = None, spare: bool = False) -> None:
        self.release(key)
        if key in self._slot:  # stored already: nothing to reserve
            return
        slot = self._new_slot(key, position=position, size=size, parent=parent,
                              flags=PENDING | (SPARE if spare else 0))
        self.bytes_pending += size
        for listener in self._listeners:
            listener.on_present(slot)

    def release(self, key: bytes) -> bool:
        """Drop a reservation; False if there was none."""
        slot = self._slot.get(key)
        if slot is None or not self._flags[slot] & PENDING:
            return False
        for listener in self._listeners:
            listener.on_absent(slot)
        self.bytes_pending -= self._size[slot]
        self._free_slot(slot)
        return True

    def add(self, key: bytes, *, group: int, position: int, size: int,
            parent: bytes | None = None, last_access: int | None = None,
            spare: bool | None = None, mtime_ns: int = 0) -> ChunkEntry:
        slot = self._slot.get(key)
        if slot is not None and self._flags[slot] & STORED:
            return ChunkEntry(self, slot, key)
        now = self.tick()
        completed = resized = False
        if slot is not None:  # a reservation completes: same slot, fresh facts
            flags = self._flags[slot]
            reserved = self._size[slot]
            self.bytes_pending -= reserved
            if spare is None:
                spare = bool(flags & SPARE)
            # the same chunk as reserved (listeners keep what they derived from it)
            completed = (self._position[slot] == position and bool(flags & SPARE) == spare
                         and self.parent_key(slot) == parent)
            resized = reserved != size
            self._position[slot] = position
            self._size[slot] = size
            self._flags[slot] = STORED | (SPARE if spare else 0)
            if self.parent_key(slot) != parent:
                self._links.unlink(slot)
                self._link(slot, parent)
        else:
            slot = self._new_slot(key, position=position, size=size, parent=parent,
                                  flags=STORED | (SPARE if spare else 0))
        self._last_access[slot] = now if last_access is None else last_access
        self._created[slot] = now
        self._last_hit.pop(slot, None)
        self._mtime[slot] = mtime_ns
        self._stored += 1
        self.bytes_stored += size
        for listener in self._listeners:
            listener.on_stored(slot, completed, resized)
        return ChunkEntry(self, slot, key)

    def remove(self, key: bytes) -> bool:
        """Forget a stored chunk (its children stay, waiting for it again)."""
        slot = self._slot.get(key)
        if slot is None or not self._flags[slot] & STORED:
            return False
        for listener in self._listeners:
            listener.on_absent(slot)
        self._stored -= 1
        self.bytes_stored -= self._size[slot]
        self._free_slot(slot)
        return True

    def touch(self, key: bytes) -> None:
        slot = self._slot.get(key)
        if slot is not None and self._flags[slot] & STORED:
            self._last_access[slot] = self.tick()
            was_spare = bool(self._flags[slot] & SPARE)
            self._flags[slot] &= ~SPARE
            for listener in self._listeners:
                listener.on_touch(slot, was_spare)

    def mark_hit(self, key: bytes) -> None:
        """A loaded hit ended at ``key``."""
        slot = self._slot.get(key)
        if slot is not None and self._flags[slot] & STORED:
            self._last_hit[slot] = self.tick()
            for listener in self._listeners:
                listener.on_hit(slot)

    def pin(self, key: bytes) -> None:
        slot = self._slot.get(key)
        if slot is not None and self._flags[slot] & STORED:
            self._pins[slot] = self._pins.get(slot, 0) + 1

    def unpin(self, key: bytes) -> None:
        slot = self._slot.get(key)
        pins = self._pins.get(slot) if slot is not None else None
        if pins is not None and self._flags[slot] & STORED:
            if pins > 1:
                self._pins[slot] = pins - 1
            else:
                del self._pins[slot]

    def clear(self) -> None:
        listeners = self._listeners
        self.__init__()  # type: ignore[misc]
        self._listeners = listeners
        for listener in listeners:
            reset = getattr(listener, "on_clear", None)
            if reset is not None:
                reset()

    # ---------------------------------------------------------------- rebuild
    def load(self, chunks: Iterable[ChunkRecord], *, by_mtime: bool = True) -> int:
        """Add chunks not yet indexed; returns how many were added.

        ``by_mtime``: add oldest file first (a scan), so recency survives a restart;
        False keeps the given order (``records()`` of an index: its recency order).
        Into an empty index with no listener (a start) the records go in one pass.
        """
        records = sorted(chunks, key=lambda c: c.mtime_ns) if by_mtime else list(chunks)
        if not self._slot and not self._listeners and records:
            return self._bulk_load(records)
        added = 0
        for chunk in records:
            if chunk.key in self:
                continue
            self.add(chunk.key, group=chunk.group, position=chunk.position,
                     size=chunk.size, parent=chunk.parent, mtime_ns=chunk.mtime_ns)
            added += 1
        return added

    def _bulk_load(self, records: list[ChunkRecord]) -> int:
        """``load`` into an empty index: columns filled at once, then one linking pass."""
        unique = self._fill(records)
        self._stored += len(unique)
        self.bytes_stored += sum(r.size for r in unique)
        return len(unique)

    def lru_slots(self) -> Iterator[int]:
        """Slots of stored chunks, least recently used first (sorted lazily, in blocks)."""
        return lru_slots(self.columns)

    def records(self) -> list[ChunkRecord]:
        """Every stored chunk, least recently used first."""
        keys, flags = self._keys, self._flags
        slots = [s for s in self._slot.values() if flags[s] & STORED]
        return [ChunkRecord(keys[s], self._group[s], self._position[s], self._size[s],
                            self.parent_key(s), self._mtime[s])
                for s in by_recency(self.columns, slots)]

    @classmethod
    def from_records(cls, chunks: Iterable[ChunkRecord]) -> ChunkIndex:
        """A new index holding ``chunks`` (e.g. ``store.scan()``)."""
        index = cls()
        index.load(chunks)
        return index

