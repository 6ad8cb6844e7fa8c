"""A persisted index snapshot: restart without reading every chunk header.

``codec`` is the file (bytes, read, write), ``validate`` the whole-snapshot
checks of its records, ``restore`` the check against the directory at start
(and ``recheck`` before a restored record's first HIT), ``writer`` the periodic
background writer. The names below are the package's interface.
"""

from __future__ import annotations

from hybridkv.store.snapshot.codec import (
    SNAPSHOT_VERSION,
    Snapshot,
    SnapshotInvalid,
    decode_snapshot,
    encode_snapshot,
    read_snapshot,
    write_snapshot,
)
from hybridkv.store.snapshot.restore import Restored, full_scan, recheck, restore
from hybridkv.store.snapshot.validate import validate_records
from hybridkv.store.snapshot.writer import SnapshotWriter

__all__ = [
    "SNAPSHOT_VERSION", "Restored", "Snapshot", "SnapshotInvalid", "SnapshotWriter",
    "decode_snapshot", "encode_snapshot", "full_scan", "read_snapshot", "recheck", "restore",
    "validate_records", "write_snapshot",
]
