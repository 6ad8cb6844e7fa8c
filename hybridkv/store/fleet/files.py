"""The fleet's files under a layout directory, and reading one of them::

    <layout_dir>/fleet/lease.json          who evicts for the fleet, and until when
    <layout_dir>/fleet/state.json          the holder's accounting: base bytes, baselines
    <layout_dir>/fleet/members/<id>.json   one member's usage (heartbeat, admitted, grant)

Invariant: every byte of these files goes through the member's ``FileIO``; a
file that is missing, unreadable or does not decode reads as None (an
unreadable one is logged), never as an error.
"""

from __future__ import annotations

import logging
from pathlib import Path

import msgspec

from hybridkv.store.file_map import FileMap, list_names
from hybridkv.store.fileio import FileIO

__all__ = ["FleetFiles", "read_record"]

log = logging.getLogger(__name__)

_USAGE_SUFFIX = ".json"


class FleetFiles:
    """Paths of the fleet files of one layout directory."""

    def __init__(self, layout_dir: str | Path):
        layout_dir = Path(layout_dir)
        self.dir = FileMap(layout_dir.parent, layout_dir.name).fleet_dir
        self.lease = self.dir / "lease.json"
        self.state = self.dir / "state.json"
        self.members = self.dir / "members"

    def usage(self, member: str) -> Path:
        return self.members / f"{member}{_USAGE_SUFFIX}"

    def usage_files(self) -> list[Path]:
        """Every member's usage file (temp files left out)."""
        return [self.members / name for name in list_names(self.members)
                if name.endswith(_USAGE_SUFFIX) and not name.startswith(".")]


def read_record(io: FileIO, path: Path, decoder: msgspec.json.Decoder):
    """The record in ``path``, or None when it is missing or unusable."""
    try:
        return decoder.decode(io.read_all(path))
    except FileNotFoundError:
        return None
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("hybridkv fleet: ignoring unreadable %s: %s", path, exc)
        return None
