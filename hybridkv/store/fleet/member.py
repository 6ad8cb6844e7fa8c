"""Fleet budget accounting: one ``disk_budget`` for every engine sharing a layout directory.

Engines coordinate through small files only (``hybridkv.store.fleet.files``:
atomic rename; ``link`` to create the lease), never ``flock``, so it works on
NFS and Lustre.

Accounting. The fleet's usage is ``U = base + sum_m (admitted_m - baseline_m +
grant_m)``: ``base`` is what the lease holder counted at its last sync (the
chunk files it listed plus every member's bytes in flight), ``admitted_m`` the
bytes member ``m`` has reserved for stores since it started (``baseline_m``:
the value the holder read just before listing), ``grant_m`` room ``m`` claimed
and has not used yet.

Invariants:
- ``U`` computed from the files is >= the bytes of chunk files on disk: files
  appear only after a reservation counted in ``admitted`` (or in the holder's
  ``base``), and only deletions the holder made itself lower ``base`` (by the
  bytes it really unlinked). Anything uncertain is counted twice, never zero times.
- A member admits a store only out of a grant it *published before* it read
  every other member's file and found ``U <= budget``. Of two concurrent
  claims the later reader sees the earlier one, so grants never oversubscribe
  the budget where a read after a rename sees the renamed file (POSIX; NFS with
  close-to-open consistency). Where reads can be stale, each member can
  overshoot by at most one grant plus one store batch: the *allowance*
  (``allowance()``).
- Only the lease holder deletes chunks for the budget. The lease decides who
  evicts, never what is correct: two holders at once (clock skew, a stalled
  holder) evict more than needed, and a deleted file is a miss for everyone.
- A member whose heartbeat is older than ``usage_ttl`` is dead: its files are
  counted by the next listing, and the holder removes its usage file then.
- A usage file that cannot be written is logged, never raised: the member then
  claims no grant (it admits nothing it has not published) and retries at the
  next poll; everything it did publish stays counted.
"""

from __future__ import annotations

import enum
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from hybridkv.store.file_map import HOST
from hybridkv.store.fileio import FileIO
from hybridkv.store.fleet.files import FleetFiles, read_record
from hybridkv.store.fleet.lease import Lease

__all__ = ["FleetAction", "FleetMember", "FleetState", "Usage", "UsageSnapshot",
           "DEFAULT_INTERVAL", "DEFAULT_LEASE_TTL", "GRANT_CAP"]

log = logging.getLogger(__name__)

#: seconds between full syncs (directory listings) while other members are alive
DEFAULT_INTERVAL = 5.0
#: seconds a lease lasts without renewal; a member silent for 2x this is dead
DEFAULT_LEASE_TTL = 15.0
#: largest grant a member claims at once (bounds the allowance on large budgets)
GRANT_CAP = 64 * 2**20


class FleetAction(enum.Enum):
    """What ``FleetMember.poll`` asks the holder to do now (None: nothing is due)."""

    SYNC = "sync"  # list the directory, then evict
    EVICT = "evict"  # a member asks for room, or usage is over the budget


class Usage(msgspec.Struct, kw_only=True):
    member: str
    host: str = ""
    pid: int = 0
    heartbeat: float = 0.0  # wall-clock seconds of the last publish
    admitted: int = 0  # bytes reserved for stores since start (monotonic)
    inflight: int = 0  # reserved bytes whose store has not completed
    grant: int = 0  # claimed room not used yet
    demand: int = 0  # bytes last refused (asks the holder to evict)


class FleetState(msgspec.Struct, kw_only=True):
    owner: str = ""
    generation: int = 0
    synced_at: float = 0.0
    base: int = 0
    baselines: dict[str, int] = {}


_usage_dec = msgspec.json.Decoder(Usage)
_state_dec = msgspec.json.Decoder(FleetState)


@dataclass
class UsageSnapshot:
    """Every member's usage as the holder read it just before listing the directory."""

    members: dict[str, Usage] = field(default_factory=dict)

    @property
    def inflight(self) -> int:
        return sum(u.inflight for u in self.members.values())

    @property
    def grants(self) -> int:
        return sum(u.grant for u in self.members.values())


class FleetMember:
    """One engine's side of the fleet budget: usage file, lease, grants, state.

    The caller (``HybridKVManager``) owns the index and deletes files; this
    class owns the files under ``fleet/`` and the arithmetic. ``clock`` is
    wall-clock time (heartbeats and leases are compared across hosts).
    """

    def __init__(self, layout_dir: str | Path, budget: int, *, interval: float = DEFAULT_INTERVAL,
                 lease_ttl: float = DEFAULT_LEASE_TTL, initial_bytes: int = 0,
                 member_id: str | None = None, io: FileIO | None = None,
                 clock: Callable[[], float] = time.time):
        if budget <= 0:
            raise ValueError(f"fleet budget must be positive, got {budget}")
        self.files = FleetFiles(layout_dir)
        self.dir = self.files.dir
        self.members_dir = self.files.members
        self.state_path = self.files.state
        self.budget = budget
        self.interval = interval
        self.usage_ttl = 2 * lease_ttl
        self.poll_s = min(0.5, interval / 4, lease_ttl / 6)
        self.clock = clock
        self.io = io or FileIO()
        self.member_id = member_id or f"{HOST}-{os.getpid()}-{secrets.token_hex(3)}"
        self.usage_path = self.files.usage(self.member_id)
        self.lease = Lease(self.files.lease, self.member_id, lease_ttl,
                           io=self.io, clock=clock)
        self.io.makedirs(self.members_dir)
        self._initial = initial_bytes  # base until a holder has published a state
        self.admitted = 0
        self.inflight = 0
        self.grant = 0
        self.demand = 0
        self._published = 0.0
        self._publish_failed = False
        self._next_poll = 0.0
        self._blocked_until = 0.0
        self._dirty = False
        self._demand_at = 0.0
        #: (holder) the largest demand another member published at the last poll
        self.wanted = 0
        self.last_sync = float("-inf")
        self.live_members = 1
        self.publish()

    # ------------------------------------------------------------------ usage files
    def publish(self) -> bool:
        """Write our usage file now. False (logged once per failing stretch; the
        figures stay due) when it cannot be written."""
        now = self.clock()
        body = msgspec.json.encode(Usage(
            member=self.member_id, host=HOST, pid=os.getpid(), heartbeat=now,
            admitted=self.admitted, inflight=self.inflight, grant=self.grant,
            demand=self.demand))
        try:
            self.io.write_atomic(self.usage_path, body)  # creates members/ if it went
        except OSError as exc:
            self._dirty = True
            if not self._publish_failed:
                self._publish_failed = True
                log.warning("hybridkv fleet: cannot write %s: %s; claiming no room until "
                            "it can be written", self.usage_path, exc)
            return False
        if self._publish_failed:
            self._publish_failed = False
            log.info("hybridkv fleet: %s written again", self.usage_path)
        self._published = now
        self._dirty = False
        return True

    def read_members(self) -> dict[str, Usage]:
        """Every member's published usage (ours included, as published)."""
        found: dict[str, Usage] = {}
        for path in self.files.usage_files():
            usage = read_record(self.io, path, _usage_dec)
            if usage is not None:
                found[usage.member] = usage
        return found

    def read_state(self) -> FleetState | None:
        return read_record(self.io, self.state_path, _state_dec)

    def usage(self, members: dict[str, Usage] | None = None,
              state: FleetState | None = None) -> int:
        """``U``: bytes the fleet may have on disk (our own live figures, others' published)."""
        members = self.read_members() if members is None else members
        state = self.read_state() if state is None else state
        base = state.base if state is not None else self._initial
        baselines = state.baselines if state is not None else {}
        total = base
        for member, u in members.items():
            if member == self.member_id:
                continue
            total += max(0, u.admitted - baselines.get(member, 0)) + u.grant
        total += max(0, self.admitted - baselines.get(self.member_id, 0)) + self.grant
        self.live_members = 1 + sum(
            1 for m, u in members.items()
            if m != self.member_id and self.clock() - u.heartbeat <= self.usage_ttl)
        return total

    # ------------------------------------------------------------------ admission
    @property
    def grant_unit(self) -> int:
        return min(GRANT_CAP, self.budget // (16 * max(1, self.live_members)))

    def allowance(self, batch_bytes: int, members: int | None = None) -> int:
        """How far above the budget chunk files may go where reads can be stale:
        each member one grant plus one store batch (0 where reads see renames)."""
        n = members if members is not None else self.live_members
        return n * (self.grant_unit + batch_bytes)

    def admit(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` for a store, from our grant or a newly claimed one."""
        if nbytes <= 0:
            return True
        now = self.clock()
        if now - self._published > self.usage_ttl / 2:
            self.grant = 0  # the holder may have declared us dead and forgotten our grant
        if nbytes > self.grant:
            if now < self._blocked_until:
                return False
            if not self._claim(nbytes - self.grant):
                self._blocked_until = now + self.poll_s
                return False
        self.grant -= nbytes
        self.admitted += nbytes
        self.inflight += nbytes
        self._dirty = True  # published at the next poll (the claim already covers it)
        if self.demand:
            self.demand = 0
            self.publish()
        return True

    def _claim(self, need: int) -> bool:
        """Publish a bigger grant, then check every member's usage (publish, then read)."""
        asks = [max(need, self.grant_unit)]
        if asks[0] > need:
            asks.append(need)
        for ask in asks:
            self.grant += ask
            if not self.publish():  # a grant nobody can see is no grant
                self.grant -= ask
                return False
            if self.usage() <= self.budget:
                return True
            self.grant -= ask
        self.demand = need
        self._demand_at = self.clock()
        self.publish()
        return False

    def done(self, nbytes: int, actual: int | None = None) -> None:
        """A reservation of ``nbytes`` ended: no longer in flight. ``actual``: the bytes
        its file holds (0: nothing was written); ``admitted`` keeps only those."""
        self.inflight = max(0, self.inflight - nbytes)
        if actual is not None and 0 <= actual < nbytes:
            self.admitted -= nbytes - actual
        self._dirty = True
        if self.inflight == 0 and nbytes > 0:
            # end of a burst: publish now, or the holder's next sync counts these bytes
            # twice (listed on disk and still in flight) and evicts for nothing
            self.publish()

    def unblock(self) -> None:
        self._blocked_until = 0.0

    # ------------------------------------------------------------------ polling
    def poll(self, force: bool = False) -> FleetAction | None:
        """Heartbeat and lease; for the holder, what to do now.

        Returns ``FleetAction.SYNC`` (list the directory, then evict),
        ``FleetAction.EVICT`` (a member asks for room, or usage is over the budget)
        or None. Cheap unless due.
        """
        now = self.clock()
        if not force and now < self._next_poll:
            return None
        self._next_poll = now + self.poll_s
        was_holder = self.lease.holds()
        holder = self.lease.acquire()
        if self.demand and now - self._demand_at > self.interval:
            self.demand = 0  # not asked again since: withdraw it (the holder keeps no room)
            self._dirty = True
        if self._dirty or now - self._published > self.usage_ttl / 3:
            self.publish()
        if not holder:
            return None
        if not was_holder:
            log.info("hybridkv fleet: %s holds the eviction lease", self.member_id)
            return FleetAction.SYNC
        members = self.read_members()
        usage = self.usage(members)
        others = self.live_members > 1
        if others and now - self.last_sync >= self.interval:
            return FleetAction.SYNC
        self.wanted = max((u.demand for m, u in members.items() if m != self.member_id),
                          default=0)
        if usage > self.budget or self.wanted:
            return FleetAction.EVICT
        return None

    @property
    def holder(self) -> bool:
        return self.lease.holds()

    def free_target(self, headroom: int) -> int:
        """Bytes the holder leaves free when it evicts: its headroom, and one grant per member."""
        return max(headroom, self.live_members * self.grant_unit)

    # ------------------------------------------------------------------ holder
    def begin_sync(self) -> UsageSnapshot:
        """Read every member's usage (ours fresh) before listing the directory."""
        self.publish()
        return UsageSnapshot(self.read_members())

    def excess(self, headroom: int, extra: int = 0, *, disk_bytes: int | None = None,
               snapshot: UsageSnapshot | None = None) -> int:
        """Bytes the holder must evict so usage + ``extra`` <= budget - free target.

        With ``disk_bytes`` and ``snapshot`` (during a sync), usage is what the
        sync will publish; otherwise it is read from the files.
        """
        if snapshot is not None and disk_bytes is not None:
            usage = disk_bytes + snapshot.inflight + snapshot.grants
        else:
            usage = self.usage()
        return usage + extra - (self.budget - self.free_target(headroom))

    def finish_sync(self, snapshot: UsageSnapshot, disk_bytes: int) -> FleetState:
        """Publish the new base (files listed after eviction + bytes in flight);
        remove the usage files of dead members (their files are now in ``disk_bytes``)."""
        now = self.clock()
        old = self.read_state()
        baselines = {}
        for member, u in snapshot.members.items():
            if member != self.member_id and now - u.heartbeat > self.usage_ttl:
                try:
                    os.unlink(self.files.usage(member))
                except OSError:
                    pass
                continue
            baselines[member] = u.admitted
        baselines[self.member_id] = snapshot.members.get(
            self.member_id, Usage(member=self.member_id)).admitted
        state = FleetState(owner=self.member_id,
                           generation=(old.generation + 1) if old else 1,
                           synced_at=now, base=disk_bytes + snapshot.inflight,
                           baselines=baselines)
        self._write_state(state)
        self.last_sync = now
        return state

    def freed(self, nbytes: int) -> None:
        """The holder unlinked ``nbytes`` of chunk files: lower ``base`` by as much."""
        if nbytes <= 0:
            return
        # no clamp at 0: base is an offset (files stored since the sync count in admitted)
        state = self.read_state()
        if state is None:
            self._initial -= nbytes
            return
        state.base -= nbytes
        state.generation += 1
        self._write_state(state)

    def _write_state(self, state: FleetState) -> None:
        try:
            self.io.write_atomic(self.state_path, msgspec.json.encode(state))
        except OSError as exc:
            log.warning("hybridkv fleet: cannot write %s: %s", self.state_path, exc)

    def close(self) -> None:
        """Clean shutdown: give up the lease, withdraw our grant."""
        self.lease.release()
        self.grant = 0
        self.demand = 0
        self.publish()
