"""What is known about one stored chunk without reading its payload.

``ChunkRecord`` is the currency between the store (which finds chunks on
disk: ``ChunkStore.scan`` / ``ChunkStore.describe``), the index snapshot and
the index (``ChunkIndex.load``). It imports nothing from the rest of hybridkv
but the key helpers, so every layer can use it.

Invariants:
- ``group == key_group(key)``; ``parent`` (when set) is a key of the same group;
- ``size`` is the file's size on disk in bytes, ``mtime_ns`` its modification
  time in nanoseconds (``os.stat_result.st_mtime_ns``).
"""

from __future__ import annotations

import msgspec

__all__ = ["ChunkRecord"]


class ChunkRecord(msgspec.Struct, frozen=True, array_like=True):
    """One chunk file: its key, place in the prefix, and file identity."""

    key: bytes
    group: int
    position: int  # end token of the chunk within its prefix
    size: int  # bytes on disk
    parent: bytes | None  # the chunk of the same group it extends
    mtime_ns: int = 0

    @property
    def mtime(self) -> float:
        return self.mtime_ns / 1e9
