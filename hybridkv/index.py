"""The in-memory catalog of stored chunks: compact columns, one key -> slot table.

Layout (struct of arrays): every chunk the index knows, stored or being stored
(*pending*), owns a *slot*; ``_slot`` maps its key to the slot and each field is
one ``array.array`` column indexed by slot (group, position, size, parent slot,
newest child / next sibling links (a circular list per parent), two logical clocks, file mtime, flags);
facts few chunks have (pins of loads in flight, when a hit last ended
there) live in small dicts. Columns grow by doubling and freed slots are reused, so a million
chunks cost one key object, one dict entry, one int and ~45 bytes of columns
each (``benchmarks/index_scale.py`` measures it). ``get`` returns a light
``ChunkEntry`` view over one slot; policies that need speed read the columns.

Invariants:
- A key is stored (``in`` the index) only once its file is complete on disk (added
  on store completion or found by a scan); *pending* keys are being written.
- ``bytes_used`` is the sum of ``size`` over stored entries plus pending reservations.
- A pinned entry (being loaded) is never removed by eviction (callers check ``pins``).
- ``parent`` links a chunk to the chunk of the SAME group it extends, whenever that
  chunk is known (stored or pending); children of an absent parent wait for it
  (``_orphans``) and are linked when it arrives. ``children`` / ``descendants``
  report stored chunks only. Chunks of different groups at one prefix position share
  a hash (``companions``). All relations derive from ``parent``, which every chunk
  header records, so they survive a restart.
- Logical clocks (``last_access``, ``created``, ``last_hit``) are unique, increasing
  ticks; when they would overflow 32 bits they are renumbered, keeping their order.
- Listeners (``subscribe``) hear every change synchronously: a chunk became known
  (``on_present``), stored (``on_stored``; ``completed``: a reservation of the same
  chunk, ``resized``: with another size), is about to be forgotten
  (``on_absent``, while its slot is still valid), was touched or hit.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator
from typing import Protocol

import numpy as np

from hybridkv.chunks import ChunkRecord
from hybridkv.keys import key_group, key_hash, make_key

__all__ = ["ChunkEntry", "ChunkIndex", "IndexListener"]

#: flag bits of a slot (``ChunkIndex.flags``)
STORED = _STORED = 1
PENDING = _PENDING = 2
SPARE = _SPARE = 4
_NONE = -1
_CLOCK_MAX = 2**32 - 1
_INITIAL = 1024


class IndexListener(Protocol):
    def on_present(self, slot: int) -> None: ...
    def on_stored(self, slot: int, completed: bool = False, resized: bool = False) -> None: ...
    def on_absent(self, slot: int) -> None: ...
    def on_touch(self, slot: int, was_spare: bool) -> None: ...
    def on_hit(self, slot: int) -> None: ...


class ChunkEntry:
    """A read-only view of one slot (valid until that chunk leaves the index)."""

    __slots__ = ("_ix", "slot", "key")

    def __init__(self, index: ChunkIndex, slot: int, key: bytes):
        self._ix = index
        self.slot = slot
        self.key = key

    group = property(lambda self: self._ix._group[self.slot])
    position = property(lambda self: self._ix._position[self.slot])
    size = property(lambda self: self._ix._size[self.slot])
    last_access = property(lambda self: self._ix._last_access[self.slot])
    created = property(lambda self: self._ix._created[self.slot])
    last_hit = property(lambda self: self._ix._last_hit.get(self.slot, 0))
    pins = property(lambda self: self._ix._pins.get(self.slot, 0))
    mtime_ns = property(lambda self: self._ix._mtime[self.slot])
    spare = property(lambda self: bool(self._ix._flags[self.slot] & _SPARE))
    stored = property(lambda self: bool(self._ix._flags[self.slot] & _STORED))

    @property
    def parent(self) -> bytes | None:
        return self._ix.parent_key(self.slot)

    @property
    def children(self) -> set[bytes]:
        ix = self._ix
        return {ix._keys[c] for c in ix.child_slots(self.slot) if ix._flags[c] & _STORED}

    def __repr__(self) -> str:
        return (f"ChunkEntry(key={self.key.hex()}, group={self.group}, position={self.position}, "
                f"size={self.size}, stored={self.stored}, spare={self.spare})")


class ChunkIndex:
    def __init__(self) -> None:
        self._slot: dict[bytes, int] = {}
        n = _INITIAL
        self._keys: list[bytes | None] = [None] * n
        self._group = array("H", bytes(2 * n))
        self._position = array("i", bytes(4 * n))
        self._size = array("I", bytes(4 * n))
        self._parent = array("i", [_NONE]) * n
        self._child = array("i", [_NONE]) * n
        self._sibling = array("i", [_NONE]) * n
        self._last_access = array("I", bytes(4 * n))
        self._created = array("I", bytes(4 * n))
        self._mtime = array("q", bytes(8 * n))
        #: rare per-chunk facts, off the columns: loads in flight, when a hit last ended here
        self._pins: dict[int, int] = {}
        self._last_hit: dict[int, int] = {}
        self._flags = bytearray(n)
        self._free = array("i", range(n - 1, -1, -1))  # free slots, next last
        #: parent key -> slots of present children waiting for it; child slot -> that key
        self._orphans: dict[bytes, set[int]] = {}
        self._orphan_parent: dict[int, bytes] = {}
        self._groups: set[int] = set()
        self._listeners: list[IndexListener] = []
        self._clock = 0
        self._stored = 0
        self.bytes_stored = 0
        self.bytes_pending = 0

    # ---------------------------------------------------------------- queries
    def __contains__(self, key: bytes) -> bool:
        slot = self._slot.get(key)
        return slot is not None and self._flags[slot] & _STORED != 0

    def __len__(self) -> int:
        return self._stored

    def __iter__(self) -> Iterator[ChunkEntry]:
        flags, keys = self._flags, self._keys
        for key, slot in list(self._slot.items()):
            if flags[slot] & _STORED and keys[slot] is key:  # still the same chunk
                yield ChunkEntry(self, slot, key)

    def get(self, key: bytes) -> ChunkEntry | None:
        slot = self._slot.get(key)
        if slot is None or not self._flags[slot] & _STORED:
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

    def is_stored_slot(self, slot: int) -> bool:
        return self._flags[slot] & _STORED != 0

    def is_pending(self, key: bytes) -> bool:
        slot = self._slot.get(key)
        return slot is not None and self._flags[slot] & _PENDING != 0

    def pending(self) -> Iterator[ChunkEntry]:
        flags = self._flags
        for key, slot in list(self._slot.items()):
            if flags[slot] & _PENDING:
                yield ChunkEntry(self, slot, key)

    def parent_key(self, slot: int) -> bytes | None:
        p = self._parent[slot]
        if p != _NONE:
            return self._keys[p]
        return self._orphan_parent.get(slot)

    def child_slots(self, slot: int) -> Iterator[int]:
        """Slots of the present (stored or pending) chunks that extend ``slot``, oldest first."""
        tail = self._child[slot]
        if tail == _NONE:
            return
        sibling = self._sibling
        c = sibling[tail]
        while True:
            nxt = sibling[c]
            yield c
            if c == tail:
                return
            c = nxt

    def companions(self, key: bytes) -> dict[int, bytes]:
        """group -> key of every stored chunk at the same prefix position as ``key``."""
        h = key_hash(key)
        out = {}
        for g in self._groups:
            k = key if g == key_group(key) else make_key(h, g)
            slot = self._slot.get(k)
            if slot is not None and self._flags[slot] & _STORED:
                out[g] = self._keys[slot]
        return out

    def descendants(self, key: bytes) -> list[bytes]:
        """Stored chunks of ``key``'s group that extend it, at any depth."""
        slot = self._slot.get(key)
        if slot is None or not self._flags[slot] & _STORED:
            return []
        out: list[bytes] = []
        flags, keys = self._flags, self._keys
        stack = [c for c in self.child_slots(slot) if flags[c] & _STORED]
        while stack:
            s = stack.pop()
            out.append(keys[s])  # type: ignore[arg-type]
            stack.extend(c for c in self.child_slots(s) if flags[c] & _STORED)
        return out

    @property
    def bytes_used(self) -> int:
        return self.bytes_stored + self.bytes_pending

    def tick(self) -> int:
        if self._clock >= _CLOCK_MAX:
            self._renumber_clocks()
        self._clock += 1
        return self._clock

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
                              flags=_PENDING | (_SPARE if spare else 0))
        self.bytes_pending += size
        for listener in self._listeners:
            listener.on_present(slot)

    def release(self, key: bytes) -> bool:
        """Drop a reservation; False if there was none."""
        slot = self._slot.get(key)
        if slot is None or not self._flags[slot] & _PENDING:
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
        if slot is not None and self._flags[slot] & _STORED:
            return ChunkEntry(self, slot, key)
        now = self.tick()
        completed = resized = False
        if slot is not None:  # a reservation completes: same slot, fresh facts
            flags = self._flags[slot]
            reserved = self._size[slot]
            self.bytes_pending -= reserved
            if spare is None:
                spare = bool(flags & _SPARE)
            # the same chunk as reserved (listeners keep what they derived from it)
            completed = (self._position[slot] == position and bool(flags & _SPARE) == spare
                         and self.parent_key(slot) == parent)
            resized = reserved != size
            self._position[slot] = position
            self._size[slot] = size
            self._flags[slot] = _STORED | (_SPARE if spare else 0)
            if self.parent_key(slot) != parent:
                self._unlink(slot)
                self._link(slot, parent)
        else:
            slot = self._new_slot(key, position=position, size=size, parent=parent,
                                  flags=_STORED | (_SPARE if spare else 0))
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
        if slot is None or not self._flags[slot] & _STORED:
            return False
        for listener in self._listeners:
            listener.on_absent(slot)
        self._stored -= 1
        self.bytes_stored -= self._size[slot]
        self._free_slot(slot)
        return True

    def touch(self, key: bytes) -> None:
        slot = self._slot.get(key)
        if slot is not None and self._flags[slot] & _STORED:
            self._last_access[slot] = self.tick()
            was_spare = bool(self._flags[slot] & _SPARE)
            self._flags[slot] &= ~_SPARE
            for listener in self._listeners:
                listener.on_touch(slot, was_spare)

    def mark_hit(self, key: bytes) -> None:
        """A loaded hit ended at ``key``."""
        slot = self._slot.get(key)
        if slot is not None and self._flags[slot] & _STORED:
            self._last_hit[slot] = self.tick()
            for listener in self._listeners:
                listener.on_hit(slot)

    def pin(self, key: bytes) -> None:
        slot = self._slot.get(key)
        if slot is not None and self._flags[slot] & _STORED:
            self._pins[slot] = self._pins.get(slot, 0) + 1

    def unpin(self, key: bytes) -> None:
        slot = self._slot.get(key)
        pins = self._pins.get(slot) if slot is not None else None
        if pins is not None and self._flags[slot] & _STORED:
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
        first: dict[bytes, int] = {}
        unique = []
        for r in records:  # the first record of a key wins, as ``add`` does
            if r.key not in first:
                first[r.key] = len(unique)
                unique.append(r)
        n = len(unique)
        while len(self._flags) < n:
            self._grow()
        self._slot = first
        self._keys[:n] = [r.key for r in unique]
        self._group[:n] = array("H", [r.group for r in unique])
        self._position[:n] = array("i", [r.position for r in unique])
        sizes = [r.size for r in unique]
        self._size[:n] = array("I", sizes)
        self._mtime[:n] = array("q", [r.mtime_ns for r in unique])
        ticks = array("I", range(self._clock + 1, self._clock + n + 1))
        self._last_access[:n] = ticks
        self._created[:n] = ticks
        self._clock += n
        self._flags[:n] = bytes([_STORED]) * n
        self._groups.update(r.group for r in unique)
        capacity = len(self._flags)
        self._free = array("i", range(capacity - 1, n - 1, -1))
        slot_of, append = first.get, self._append_child
        for c in range(n):  # children in slot (= load) order
            pk = unique[c].parent
            if pk is None:
                continue
            p = slot_of(pk)
            if p is None:
                self._orphan_parent[c] = pk
                self._orphans.setdefault(pk, set()).add(c)
                continue
            append(p, c)
        self._stored += n
        self.bytes_stored += sum(sizes)
        return n

    def lru_slots(self) -> Iterator[int]:
        """Slots of stored chunks, least recently used first (sorted lazily, in blocks)."""
        n = len(self._flags)
        flags = np.frombuffer(self._flags, dtype=np.uint8)[:n]
        slots = np.flatnonzero(flags & _STORED)
        if not len(slots):
            return
        access = np.frombuffer(self._last_access, dtype=np.uint32)[slots]
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

    def records(self) -> list[ChunkRecord]:
        """Every stored chunk, least recently used first."""
        keys, flags = self._keys, self._flags
        slots = [s for s in self._slot.values() if flags[s] & _STORED]
        access = np.frombuffer(self._last_access, dtype=np.uint32)
        order = np.asarray(slots, dtype=np.int64)
        order = order[np.argsort(access[order], kind="stable")] if slots else order
        return [ChunkRecord(keys[s], self._group[s], self._position[s], self._size[s],
                            self.parent_key(s), self._mtime[s]) for s in order.tolist()]

    @classmethod
    def from_records(cls, chunks: Iterable[ChunkRecord]) -> ChunkIndex:
        """A new index holding ``chunks`` (e.g. ``store.scan()``)."""
        index = cls()
        index.load(chunks)
        return index

    # ---------------------------------------------------------------- internals
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
        # children that were waiting for this key
        waiting = self._orphans.pop(key, None)
        if waiting:
            for c in sorted(waiting):
                del self._orphan_parent[c]
                self._append_child(slot, c)
        return slot

    def _free_slot(self, slot: int) -> None:
        key = self._keys[slot]
        self._unlink(slot)
        # present children now wait for this key again
        if self._child[slot] != _NONE:
            waiting = self._orphans.setdefault(key, set())  # type: ignore[arg-type]
            for c in list(self.child_slots(slot)):
                self._parent[c] = _NONE
                self._sibling[c] = _NONE
                self._orphan_parent[c] = key  # type: ignore[assignment]
                waiting.add(c)
        self._child[slot] = _NONE
        del self._slot[key]  # type: ignore[arg-type]
        self._keys[slot] = None
        self._flags[slot] = 0
        self._pins.pop(slot, None)
        self._last_hit.pop(slot, None)
        self._free.append(slot)

    def _link(self, slot: int, parent: bytes | None) -> None:
        self._parent[slot] = _NONE
        self._sibling[slot] = _NONE
        if parent is None:
            return
        p = self._slot.get(parent)
        if p is None:
            self._orphan_parent[slot] = parent
            self._orphans.setdefault(parent, set()).add(slot)
            return
        self._append_child(p, slot)

    def _append_child(self, p: int, c: int) -> None:
        """Children form a circular list; ``_child[p]`` is its newest (tail) entry, so the
        oldest child, the one eviction removes first, is unlinked in O(1)."""
        sibling = self._sibling
        self._parent[c] = p
        tail = self._child[p]
        if tail == _NONE:
            sibling[c] = c
        else:
            sibling[c] = sibling[tail]
            sibling[tail] = c
        self._child[p] = c

    def _unlink(self, slot: int) -> None:
        p = self._parent[slot]
        if p != _NONE:
            sibling = self._sibling
            tail = self._child[p]
            if sibling[slot] == slot:  # the only child
                self._child[p] = _NONE
            else:
                pred = tail
                while sibling[pred] != slot:  # from the tail: the oldest child comes first
                    pred = sibling[pred]
                sibling[pred] = sibling[slot]
                if tail == slot:
                    self._child[p] = pred
        else:
            key = self._orphan_parent.pop(slot, None)
            if key is not None:
                waiting = self._orphans.get(key)
                if waiting is not None:
                    waiting.discard(slot)
                    if not waiting:
                        del self._orphans[key]
        self._parent[slot] = _NONE
        self._sibling[slot] = _NONE

    def _grow(self) -> None:
        n = len(self._flags)
        self._keys.extend([None] * n)
        for name in ("_group", "_position", "_size", "_last_access", "_created", "_mtime"):
            col: array = getattr(self, name)
            col.frombytes(bytes(col.itemsize * n))
        for name in ("_parent", "_child", "_sibling"):
            getattr(self, name).extend(array("i", [_NONE]) * n)
        self._flags.extend(bytes(n))
        self._free.extend(range(2 * n - 1, n - 1, -1))

    def _renumber_clocks(self) -> None:
        """Compress the logical clocks to 1..k, keeping their order (and 0 = never)."""
        cols = [np.frombuffer(c, dtype=np.uint32) for c in (self._last_access, self._created)]
        hits = np.fromiter(self._last_hit.values(), dtype=np.uint32, count=len(self._last_hit))
        values, inverse = np.unique(np.concatenate([*cols, hits]), return_inverse=True)
        ranks = np.arange(len(values), dtype=np.uint32) + (0 if values[0] == 0 else 1)
        new = ranks[inverse]
        n = len(cols[0])
        del cols
        self._last_access = array("I", new[:n].tobytes())
        self._created = array("I", new[n:2 * n].tobytes())
        self._last_hit = dict(zip(self._last_hit, new[2 * n:].tolist()))
        self._clock = int(new.max())
