"""Whether a snapshot's records can be trusted as a whole, checked column by column.

Invariant: ``validate_records`` raises ``SnapshotInvalid`` unless every record
agrees with its key (group, parent's group, key length) and every field fits
the index's columns (``hybridkv.index``); a hand-edited snapshot with a valid
checksum is refused here, before anything is loaded.
"""

from __future__ import annotations

from array import array

import numpy as np

from hybridkv.chunks import ChunkRecord
from hybridkv.store.snapshot.codec import SnapshotInvalid

__all__ = ["validate_records"]

#: the index's column types (``hybridkv.index``): a value one cannot hold is hand-made
_COLUMNS = (("position", "i"), ("size", "I"), ("mtime_ns", "q"), ("group", "I"))


def _fits(code: str, value: int) -> bool:
    try:
        array(code, [value])
    except OverflowError:
        return False
    return True


def validate_records(records: list[ChunkRecord], keys: list[bytes]) -> None:
    """``SnapshotInvalid`` unless every record agrees with its key (group, parent's
    group, key length) and fits the index's columns. Whole columns at once; the
    record named in the error is looked for only when a check failed."""
    if not records:
        return
    columns = {"position": [r.position for r in records], "size": [r.size for r in records],
               "mtime_ns": [r.mtime_ns for r in records], "group": [r.group for r in records]}
    for name, code in _COLUMNS:
        try:
            column = array(code, columns[name])  # OverflowError: a value it cannot hold
        except OverflowError:
            bad = next(r for r in records if not _fits(code, getattr(r, name)))
            raise SnapshotInvalid(f"record {bad.key.hex()[:80]}: {name} "
                                  f"{getattr(bad, name)} out of range") from None
    groups = np.asarray(column)  # the "group" column, as unsigned ints
    # a record without a parent compares its key with itself
    parents = [k if r.parent is None else r.parent for k, r in zip(keys, records)]
    lengths = set(map(len, keys))
    ok = min(lengths) >= 5
    if ok and len(lengths) == 1 and lengths == set(map(len, parents)):  # the usual case
        width = lengths.pop()
        tails = [np.ascontiguousarray(np.frombuffer(b"".join(col), dtype=np.uint8)
                                      .reshape(len(col), width)[:, width - 4:]).view(">u4")
                 for col in (keys, parents)]
        ok = bool(np.array_equal(tails[0].ravel(), groups) and np.array_equal(*tails))
    elif ok:
        ok = all(int.from_bytes(k[-4:], "big") == g and p[-4:] == k[-4:]
                 for k, p, g in zip(keys, parents, groups))
    if not ok:
        for rec in records:
            key, parent = rec.key, rec.parent
            if (len(key) < 5 or int.from_bytes(key[-4:], "big") != rec.group
                    or (parent is not None and parent[-4:] != key[-4:])):
                raise SnapshotInvalid(f"record {key.hex()[:80]} contradicts its key")
        raise AssertionError("unreachable: a contradiction was found above")  # pragma: no cover
