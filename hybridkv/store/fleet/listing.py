"""Reconciling an index with the chunk files other engines wrote or deleted.

Invariants:
- ``list_keys`` reads directory listings only (``FileMap.leaves``,
  ``list_names``): no file contents, no index, so it may run in a background
  thread (the listing is the slow part: about 14 us per file on a local disk,
  more on NFS).
- ``apply_listing`` only adds what it could describe from the file itself and
  removes only entries whose file is gone now (never a pinned entry, never one
  added after the listing).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from hybridkv.chunks import ChunkRecord
from hybridkv.store.file_map import is_chunk_name, key_of_name, list_names
from hybridkv.store.format import ChunkError

__all__ = ["apply_listing", "list_keys", "sync_index"]

log = logging.getLogger(__name__)


def list_keys(store) -> set[bytes]:
    """Keys of every chunk file of ``store``'s rank, from directory listings only
    (the leaf directories ``r<rank>/g<group>/<hh>/`` of the layout's groups)."""
    seen: set[bytes] = set()
    for leaf in store.paths.leaves(g.index for g in store.layout.groups):
        for name in list_names(leaf.path):
            if not is_chunk_name(name):
                continue
            try:
                seen.add(key_of_name(name))
            except ValueError:
                continue
    return seen


def apply_listing(store, index, seen: set[bytes], *,
                  remove: Callable[[list[bytes]], object] | None = None) -> tuple[int, int]:
    """Bring ``index`` up to date with a listing (``list_keys``) of ``store``.

    Names the index does not know are described (header + stat) and loaded;
    stored entries not listed whose file is gone now are removed (an entry added
    after the listing still has its file; pinned entries are left for their load
    to fail closed). Keys being stored by this process (pending) are left alone.
    ``remove`` (e.g. the capacity layer's, which also reclaims the orphans a vanished
    chunk leaves) replaces ``index.remove``. Returns (added, vanished).
    """
    new: list[ChunkRecord] = []
    for key in seen:
        if key in index or index.get_any(key) is not None:
            continue
        try:
            new.append(store.describe(key))
        except (OSError, ValueError, ChunkError) as exc:
            log.debug("hybridkv fleet: skipping %s: %s", key.hex(), exc)
    added = index.load(new)
    gone = [e.key for e in list(index)
            if e.key not in seen and not e.pins and not store.path(e.key).exists()]
    if remove is not None:
        remove(gone)
    else:
        for key in gone:
            index.remove(key)
    return added, len(gone)


def sync_index(store, index) -> tuple[int, int]:
    """``apply_listing(store, index, list_keys(store))``: list, then update the index."""
    return apply_listing(store, index, list_keys(store))
