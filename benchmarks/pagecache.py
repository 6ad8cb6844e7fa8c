"""Drop files from the page cache without root, so the next read comes from the disk.

``fsync`` first (dirty pages cannot be dropped), then ``posix_fadvise(DONTNEED)``. On
filesystems that ignore the advice (some overlay and network filesystems) a "cold" read
stays warm: compare cold figures with the raw file read measured the same way.
"""

from __future__ import annotations

import os
from collections.abc import Iterable


def drop_page_cache(paths: Iterable[os.PathLike | str]) -> int:
    """Evict each file's pages; returns the bytes of the files dropped (missing files skipped)."""
    total = 0
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue  # evicted or replaced meanwhile
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total
