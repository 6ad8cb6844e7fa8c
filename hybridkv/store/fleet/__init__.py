"""Fleet budget: one ``disk_budget`` for every engine sharing a layout directory.

``files`` names the fleet's files, ``lease`` is the eviction lease, ``member``
the accounting (usage files, grants, the holder's state) and ``listing`` the
reconciliation of an index with the directory. The names below are the
package's interface.
"""

from __future__ import annotations

from hybridkv.store.file_map import FLEET_DIR
from hybridkv.store.fleet.lease import Lease, LeaseRecord
from hybridkv.store.fleet.listing import apply_listing, list_keys, sync_index
from hybridkv.store.fleet.member import (
    DEFAULT_INTERVAL,
    DEFAULT_LEASE_TTL,
    GRANT_CAP,
    FleetAction,
    FleetMember,
    FleetState,
    Usage,
    UsageSnapshot,
)

__all__ = ["FleetAction", "FleetMember", "FleetState", "Lease", "LeaseRecord", "Usage",
           "UsageSnapshot", "apply_listing", "list_keys", "sync_index",
           "FLEET_DIR", "DEFAULT_INTERVAL", "DEFAULT_LEASE_TTL", "GRANT_CAP"]
