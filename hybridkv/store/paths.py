"""Where things live under a cache directory. Every path is a pure function.

    <cache_dir>/<fingerprint>/layout.json                       the layout, for people and tools
    <cache_dir>/<fingerprint>/r<rank>/g<group>/<hh>/<key>.safetensors   one chunk
    <cache_dir>/<fingerprint>/r<rank>/index.snapshot            the index snapshot of that rank
    <cache_dir>/<fingerprint>/quarantine/                       files that failed verification
    <cache_dir>/<fingerprint>/stats/                            per-process counters (JSON)

``<key>`` is the hex of the chunk key and ``<hh>`` the first byte of its hash,
so no directory grows past a few thousand entries per 2**8 fan-out level and a
key can never name a path outside its directory.
"""

from __future__ import annotations

from pathlib import Path

from hybridkv.keys import key_group, key_hex

__all__ = ["ChunkPaths", "CHUNK_SUFFIX", "SNAPSHOT_NAME", "TMP_SUFFIX"]

CHUNK_SUFFIX = ".safetensors"
TMP_SUFFIX = ".tmp"
SNAPSHOT_NAME = "index.snapshot"


class ChunkPaths:
    """Path arithmetic for one layout fingerprint and one worker rank."""

    def __init__(self, cache_dir: str | Path, fingerprint: str, rank: int = 0):
        self.cache_dir = Path(cache_dir)
        self.layout_dir = self.cache_dir / fingerprint
        self.rank = rank

    def rank_dir(self, rank: int | None = None) -> Path:
        return self.layout_dir / f"r{self.rank if rank is None else rank}"

    def group_dir(self, group: int, rank: int | None = None) -> Path:
        return self.rank_dir(rank) / f"g{group}"

    def chunk(self, key: bytes, rank: int | None = None) -> Path:
        hx = key_hex(key)
        return self.group_dir(key_group(key), rank) / hx[:2] / f"{hx}{CHUNK_SUFFIX}"

    def snapshot(self, rank: int | None = None) -> Path:
        """The index snapshot of a rank (``hybridkv.store.snapshot``)."""
        return self.rank_dir(rank) / SNAPSHOT_NAME

    @property
    def layout_file(self) -> Path:
        return self.layout_dir / "layout.json"

    @property
    def quarantine_dir(self) -> Path:
        return self.layout_dir / "quarantine"

    @property
    def stats_dir(self) -> Path:
        return self.layout_dir / "stats"
