"""The in-memory catalog of stored chunks, rebuilt from the directory at start.

Invariants:
- A key is in the index only once its file is complete on disk (added on
  store completion or found by a scan); ``pending`` keys are being written.
- ``bytes_used`` is the sum of ``size`` over entries plus pending reservations.
- A pinned entry (being loaded) is never removed by eviction.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from hybridkv.store.chunk_store import ChunkStore, StoredChunk

__all__ = ["ChunkEntry", "ChunkIndex"]


@dataclass(slots=True)
class ChunkEntry:
    key: bytes
    group: int
    position: int
    size: int
    parent: bytes | None = None
    last_access: int = 0
    pins: int = 0
    hits: int = 0
    children: set[bytes] = field(default_factory=set)


class ChunkIndex:
    def __init__(self) -> None:
        self._entries: dict[bytes, ChunkEntry] = {}
        self._pending: dict[bytes, int] = {}  # key -> reserved bytes
        self._clock = 0
        self.bytes_stored = 0

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

    @property
    def bytes_used(self) -> int:
        return self.bytes_stored + sum(self._pending.values())

    def tick(self) -> int:
        self._clock += 1
        return self._clock

    # ---------------------------------------------------------------- updates
    def reserve(self, key: bytes, size: int) -> None:
        self._pending[key] = size

    def release(self, key: bytes) -> None:
        self._pending.pop(key, None)

    def add(self, key: bytes, *, group: int, position: int, size: int,
            parent: bytes | None = None, last_access: int | None = None) -> ChunkEntry:
        self._pending.pop(key, None)
        old = self._entries.get(key)
        if old is not None:
            return old
        entry = ChunkEntry(key=key, group=group, position=position, size=size, parent=parent,
                           last_access=self.tick() if last_access is None else last_access)
        self._entries[key] = entry
        self.bytes_stored += size
        if parent is not None and parent in self._entries:
            self._entries[parent].children.add(key)
        return entry

    def remove(self, key: bytes) -> ChunkEntry | None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self.bytes_stored -= entry.size
        if entry.parent is not None and entry.parent in self._entries:
            self._entries[entry.parent].children.discard(key)
        return entry

    def touch(self, key: bytes) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            entry.last_access = self.tick()

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
        self.bytes_stored = 0

    # ---------------------------------------------------------------- rebuild
    def load(self, chunks: Iterable[StoredChunk]) -> int:
        """Add scanned chunks (oldest first, so recency survives a restart)."""
        added = 0
        for chunk in sorted(chunks, key=lambda c: c.mtime):
            if chunk.key in self._entries:
                continue
            self.add(chunk.key, group=chunk.group, position=chunk.position,
                     size=chunk.size, parent=chunk.parent)
            added += 1
        self._link_children()
        return added

    def _link_children(self) -> None:
        for entry in self._entries.values():
            if entry.parent is not None and entry.parent in self._entries:
                self._entries[entry.parent].children.add(entry.key)

    @classmethod
    def rebuild(cls, store: ChunkStore) -> ChunkIndex:
        index = cls()
        index.load(store.scan())
        return index
