"""What ``hybridkv demo`` and ``hybridkv stats`` say about store failures and free space.

Invariants:
- ``failure_line`` names every cause of ``FAILURE_CAUSES`` (zeros included) from the
  summed counters, with the stores skipped for space beside them.
- ``space_line`` is one line, or None when the filesystem has room above its floor
  and no store failed or was skipped for lack of space; it reads the free space itself (one
  ``statvfs``), so it speaks even where a full disk kept the counters from being
  written.
"""

from __future__ import annotations

import os

from hybridkv.store.failures import FAILURE_CAUSES, NO_SPACE
from hybridkv.store.free_space import measure
from hybridkv.tools.common import human_bytes

__all__ = ["failure_line", "space_line"]


def failure_line(totals: dict[str, int]) -> str:
    """``store failures: no space N, permission N, read-only N, other N; ...``"""
    causes = ", ".join(f"{c.replace('_', ' ').replace('read only', 'read-only')} "
                       f"{totals.get(f'store_failures_{c}', 0)}" for c in FAILURE_CAUSES)
    return (f"store failures: {causes}; stores skipped for free space: "
            f"{totals.get('stores_skipped_floor', 0)} (floor), "
            f"{totals.get('stores_skipped_disk_full', 0)} (backing off a full disk)")


def space_line(cache_dir: str | os.PathLike, totals: dict[str, int],
               min_free_space: int | str | None = None) -> str | None:
    """One line when ``cache_dir``'s filesystem is full or below the floor, else None."""
    try:
        space = measure(cache_dir, min_free_space)
    except OSError as exc:
        return f"cannot read the free space of {cache_dir}: {exc.strerror}"
    failed = totals.get(f"store_failures_{NO_SPACE}", 0)
    skipped = totals.get("stores_skipped_floor", 0) + totals.get("stores_skipped_disk_full", 0)
    where = (f"{human_bytes(space.free)} free of {human_bytes(space.total)}, floor "
             f"(min_free_space) {human_bytes(space.floor)}")
    if space.free == 0 or (failed and space.below_floor):
        counted = (f"{failed} stores failed for lack of space, {skipped} skipped"
                   if totals else "its counters could not be written either")
        return (f"the cache directory's filesystem is full ({cache_dir}: {where}): hybridkv "
                f"stores nothing there until space is freed ({counted}); free space there "
                "or move cache_dir")
    if space.below_floor:
        return (f"the cache directory's filesystem is below the free-space floor "
                f"({cache_dir}: {where}); hybridkv evicts and stores less to stay above it")
    if failed:
        return (f"{failed} stores failed for lack of space in {cache_dir} ({where}): a full "
                "disk or quota at the time; hybridkv evicted and backed off")
    if skipped:
        return (f"the cache directory's filesystem is at the free-space floor ({cache_dir}: "
                f"{where}): {skipped} stores skipped to keep it free; give the cache more "
                "space or lower min_free_space")
    return None
