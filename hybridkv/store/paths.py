"""The old name of ``hybridkv.store.file_map`` (``ChunkPaths`` is ``FileMap``).

Kept for code that imports it; new code imports ``hybridkv.store.file_map``.
"""

from __future__ import annotations

from hybridkv.store.file_map import CHUNK_SUFFIX, SNAPSHOT_NAME, TMP_SUFFIX, FileMap

__all__ = ["ChunkPaths", "CHUNK_SUFFIX", "SNAPSHOT_NAME", "TMP_SUFFIX"]

ChunkPaths = FileMap
