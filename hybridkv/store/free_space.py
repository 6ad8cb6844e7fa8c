"""The free space of a cache directory's filesystem and the floor hybridkv keeps there.

Invariants:
- ``floor_bytes`` is a pure function of ``min_free_space`` and the filesystem's size:
  bytes as given, ``"N%"`` of the size, or (None) the default, ``DEFAULT_FLOOR_FRACTION``
  of the size or ``DEFAULT_FLOOR_BYTES``, whichever is smaller.
- ``measure`` makes one ``statvfs`` call; free space is ``f_bavail`` (what an
  unprivileged writer may still use).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["DEFAULT_FLOOR_BYTES", "DEFAULT_FLOOR_FRACTION", "Space", "floor_bytes", "measure"]

#: default floor: this fraction of the filesystem or DEFAULT_FLOOR_BYTES, the smaller
DEFAULT_FLOOR_FRACTION = 0.05
DEFAULT_FLOOR_BYTES = 4 * 2**30


def floor_bytes(min_free_space: int | str | None, total: int) -> int:
    """``min_free_space`` (bytes, ``"N%"`` of ``total``, or None: the default) in bytes."""
    if min_free_space is None:
        return min(int(total * DEFAULT_FLOOR_FRACTION), DEFAULT_FLOOR_BYTES)
    if isinstance(min_free_space, str):
        return int(total * float(min_free_space.rstrip("%")) / 100)
    return int(min_free_space)


@dataclass(frozen=True)
class Space:
    free: int
    total: int
    floor: int

    @property
    def below_floor(self) -> bool:
        return self.free < self.floor


def measure(path: str | os.PathLike, min_free_space: int | str | None = None, *,
            statvfs: Callable[[str], os.statvfs_result] = os.statvfs) -> Space:
    """Free and total bytes of ``path``'s filesystem and its floor; OSError if unreadable."""
    st = statvfs(os.fspath(path))
    total = st.f_blocks * st.f_frsize
    return Space(st.f_bavail * st.f_frsize, total, floor_bytes(min_free_space, total))
