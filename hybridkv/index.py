"""The in-memory catalog of stored chunks, rebuilt from the directory at start.

Invariants:
- A key is in the index only once its file is complete on disk (added on
  store completion or found by a scan); ``pending`` keys are being written.
- ``bytes_used`` is the sum of ``size`` over entries plus pending reservations.
- A pinned entry (being loaded) is never removed by eviction.
- ``children`` links a chunk to the chunks of the SAME group that extend it by
  one chunk; chunks of different groups at the same prefix position share a
  hash (``companions``). Both relations are derived from ``parent``, which is
  recorded in every chunk header, so they survive a restart.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from hybridkv.keys import key_group, key_hash
from hybridkv.chunks import ChunkRecord

__all__ = ["ChunkEntry", "ChunkIndex"]


@dataclass(slots=True)
class ChunkEntry:
    key: bytes
    group: int
    position: int
    size: int
    parent: bytes | None = None
    last_access: int = 0
    #: when it was added, and when a loaded hit last ended at it (0: never)
    created: int = 0
    last_hit: int = 0
    pins: int = 0
    #: admitted as SPARE (not at a likely hit point): evicted before checkpoints
    spare: bool = False
    #: the file's modification time (ns) when it was added, for snapshots; 0 if unknown
    mtime_ns: int = 0
    children: set[bytes] = field(default_factory=set)


class ChunkIndex:
    def __init__(self) -> None:
        self._entries: dict[bytes, ChunkEntry] = {}
        self._pending: dict[bytes, ChunkEntry] = {}  # key -> reservation (not yet on disk)
        self._by_hash: dict[bytes, dict[int, bytes]] = {}
        #: parent key -> stored children whose parent is not stored (yet, or any more)
        self._orphan_children: dict[bytes, set[bytes]] = {}
        self._clock = 0
        self.bytes_stored = 0
        self.bytes_pending = 0

    # ---------------------------------------------------------------- queries
    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[ChunkEntry]:
        return iter(self._entries.values())

    def get(self, key: bytes) -> ChunkEntry | None:
        return self._entries.get(key)

    def is_pending(self, key: bytes) -> bool:
        return key in self._pending

    def pending(self) -> Iterator[ChunkEntry]:
        return iter(self._pending.values())

    def get_any(self, key: bytes) -> ChunkEntry | None:
        """The entry, stored or being stored."""
        return self._entries.get(key) or self._pending.get(key)

    def companions(self, key: bytes) -> dict[int, bytes]:
        """group -> key of every stored chunk at the same prefix position as ``key``."""
        return dict(self._by_hash.get(key_hash(key), {}))

    def descendants(self, key: bytes) -> list[bytes]:
        """Stored chunks of ``key``'s group that extend it, at any depth."""
        out: list[bytes] = []
        entry = self._entries.get(key)
        stack = list(entry.children) if entry is not None else []
        while stack:
            k = stack.pop()
            child = self._entries.get(k)
            if child is None:
                continue
            out.append(k)
            stack.extend(child.children)
        return out

    @property
    def bytes_used(self) -> int:
        return self.bytes_stored + self.bytes_pending

    def tick(self) -> int:
        self._clock += 1
        return self._clock

    # ---------------------------------------------------------------- updates
    def reserve(self, key: bytes, size: int, *, position: int = 0,
                parent: bytes | None = None, spare: bool = False) -> None:
        self.release(key)
        self._pending[key] = ChunkEntry(key=key, group=key_group(key), position=position,
                                        size=size, parent=parent, spare=spare)
        self.bytes_pending += size

    def release(self, key: bytes) -> ChunkEntry | None:
        entry = self._pending.pop(key, None)
        if entry is not None:
            self.bytes_pending -= entry.size
        return entry

    def add(self, key: bytes, *, group: int, position: int, size: int,
            parent: bytes | None = None, last_access: int | None = None,
            spare: bool | None = None, mtime_ns: int = 0) -> ChunkEntry:
        reservation = self.release(key)
        old = self._entries.get(key)
        if old is not None:
            return old
        if spare is None:
            spare = reservation.spare if reservation is not None else False
        now = self.tick()
        entry = ChunkEntry(key=key, group=group, position=position, size=size, parent=parent,
                           last_access=now if last_access is None else last_access,
                           created=now, spare=spare, mtime_ns=mtime_ns)
        self._entries[key] = entry
        self.bytes_stored += size
        self._by_hash.setdefault(key_hash(key), {})[group] = key
        if parent is not None and parent in self._entries:
            self._entries[parent].children.add(key)
        for child_key in self._orphan_children.pop(key, ()):
            if child_key in self._entries:
                entry.children.add(child_key)
        if parent is not None and parent not in self._entries:
            self._orphan_children.setdefault(parent, set()).add(key)
        return entry

    def remove(self, key: bytes) -> ChunkEntry | None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self.bytes_stored -= entry.size
        same_pos = self._by_hash.get(key_hash(key))
        if same_pos is not None:
            same_pos.pop(entry.group, None)
            if not same_pos:
                del self._by_hash[key_hash(key)]
        if entry.parent is not None:
            if entry.parent in self._entries:
                self._entries[entry.parent].children.discard(key)
            waiting = self._orphan_children.get(entry.parent)
            if waiting is not None:
                waiting.discard(key)
                if not waiting:
                    del self._orphan_children[entry.parent]
        if entry.children:
            # the children stay (until evicted); they wait for their parent again
            self._orphan_children.setdefault(key, set()).update(entry.children)
        return entry

    def touch(self, key: bytes) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            entry.last_access = self.tick()
            entry.spare = False

    def mark_hit(self, key: bytes) -> None:
        """A loaded hit ended at ``key``."""
        entry = self._entries.get(key)
        if entry is not None:
            entry.last_hit = self.tick()

    def pin(self, key: bytes) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            entry.pins += 1

    def unpin(self, key: bytes) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry.pins > 0:
            entry.pins -= 1

    def clear(self) -> None:
        self._entries.clear()
        self._pending.clear()
        self._by_hash.clear()
        self._orphan_children.clear()
        self.bytes_stored = 0
        self.bytes_pending = 0

    # ---------------------------------------------------------------- rebuild
    def load(self, chunks: Iterable[ChunkRecord], *, by_mtime: bool = True) -> int:
        """Add chunks not yet indexed; returns how many were added.

        ``by_mtime``: add oldest file first (a scan), so recency survives a restart;
        False keeps the given order (``records()`` of an index: its recency order).
        """
        added = 0
        for chunk in sorted(chunks, key=lambda c: c.mtime_ns) if by_mtime else chunks:
            if chunk.key in self._entries:
                continue
            self.add(chunk.key, group=chunk.group, position=chunk.position,
                     size=chunk.size, parent=chunk.parent, mtime_ns=chunk.mtime_ns)
            added += 1
        return added

    def records(self) -> list[ChunkRecord]:
        """Every stored chunk, least recently used first."""
        return [ChunkRecord(e.key, e.group, e.position, e.size, e.parent, e.mtime_ns)
                for e in sorted(self._entries.values(), key=lambda e: e.last_access)]

    @classmethod
    def from_records(cls, chunks: Iterable[ChunkRecord]) -> ChunkIndex:
        """A new index holding ``chunks`` (e.g. ``store.scan()``)."""
        index = cls()
        index.load(chunks)
        return index
