"""``FleetSync``: one ``disk_budget`` for every engine on a directory, seen from one engine.

``hybridkv.store.fleet`` owns the files under ``fleet/`` and the arithmetic (lease,
usage, grants); this class drives it for one ``CacheService``: heartbeats, the
holder's directory syncs and evictions, admission of store batches against the
fleet's grants, and the accounting of what this engine writes and unlinks.

Invariants:
- Only the lease holder evicts: ``capacity.budget`` is the configured budget while
  this engine holds the lease and None otherwise (``tick`` keeps it so). The holder
  also evicts what ``floor_excess()`` asks for the filesystem's free-space floor
  (``DiskFloor``), so one engine evicts at a time for the floor too.
- Every admitted store is reserved with the fleet before it is written
  (``admit``) and its reservation returned when it ends (``store_done``), with the
  bytes really written; nothing past a chunk the fleet had no room for is stored.
- The holder lowers the fleet's usage only by bytes it really unlinked (``unlink``).
- A sync lists the directory in a background thread; the index changes only on the
  caller's thread, when the listing is done (``tick``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor

from hybridkv.capacity import Capacity, StorePlan
from hybridkv.config import HybridKVConfig
from hybridkv.index import ChunkIndex
from hybridkv.stats import Counters
from hybridkv.store.chunk_store import ChunkStore
from hybridkv.store.fleet import FleetAction, FleetMember, UsageSnapshot, apply_listing, list_keys

__all__ = ["FleetSync"]

log = logging.getLogger(__name__)

#: ``drop(keys, cause)``: delete the files of keys already removed from the index
Drop = Callable[[list[bytes], str], None]


class FleetSync:
    def __init__(self, store: ChunkStore, index: ChunkIndex, capacity: Capacity,
                 config: HybridKVConfig, counters: Counters, drop: Drop, *,
                 clock: Callable[[], float] | None = None, executor: Executor | None = None,
                 floor_excess: Callable[[], int] | None = None):
        self.store = store
        #: bytes to evict now for the free-space floor (the service's ``DiskFloor``)
        self.floor_excess = floor_excess
        self.index = index
        self.capacity = capacity
        self.config = config
        self.counters = counters
        self.drop = drop
        extra = {} if clock is None else {"clock": clock}
        self.member = FleetMember(store.paths.layout_dir, config.disk_budget,
                                  interval=config.fleet_interval,
                                  lease_ttl=config.fleet_lease_ttl,
                                  initial_bytes=index.bytes_stored, io=store.io, **extra)
        self.capacity.budget = None  # only the lease holder evicts
        self._reserved: dict[bytes, int] = {}  # key -> bytes admitted for its store
        #: (usage snapshot, listing) while a sync lists the directory
        self._listing: tuple[UsageSnapshot, Future] | None = None
        #: runs directory listings (one thread by default; a test may run them inline)
        self._pool = executor or ThreadPoolExecutor(1, thread_name_prefix="hybridkv-fleet")
        self.tick(force=True)

    @property
    def holder(self) -> bool:
        return self.member.holder

    def tick(self, force: bool = False) -> None:
        """Heartbeat, lease, and (holder) sync or evict when due; a clock read otherwise."""
        member = self.member
        action = member.poll(force)
        self.capacity.budget = self.config.disk_budget if member.holder else None
        if action is FleetAction.SYNC or (self._listing is not None
                                          and self._listing[1].done()):
            self.sync()
        elif action is FleetAction.EVICT:
            self.evict(member.wanted)  # room for the largest refused batch
        if member.holder and self.floor_excess is not None:
            over = self.floor_excess()
            if over > 0:
                self._shed(over)

    def sync(self, wait: bool = False) -> None:
        """Holder: list the directory (in a thread), then index what it found, evict for
        the fleet and publish. Returns at once while the listing runs (unless ``wait``)."""
        member = self.member
        if self._listing is None:
            snapshot = member.begin_sync()  # before listing: the baselines of what we list
            self._listing = (snapshot, self._pool.submit(list_keys, self.store))
        snapshot, listing = self._listing
        if not (wait or listing.done()):
            return
        self._listing = None
        try:
            seen = listing.result()
        except OSError as exc:
            log.warning("hybridkv fleet: cannot list %s: %s", self.store.paths.layout_dir, exc)
            return
        if not member.holder:
            return  # lost the lease meanwhile: the next holder syncs
        added, gone = apply_listing(  # a vanished chunk takes its orphans (policy) along
            self.store, self.index, seen,
            remove=lambda keys: self.drop(self.capacity.remove(keys), "gone"))
        self.counters.add("fleet_syncs")
        self.counters.add("fleet_found", added)
        self.counters.add("fleet_gone", gone)
        # base = what the listing saw (files stored since the usage snapshot and not listed
        # count through their engine's admitted bytes), then evict against the new state
        listed = 0
        for key in seen:
            entry = self.index.get(key)
            listed += entry.size if entry is not None else 0
        member.finish_sync(snapshot, listed)
        self.evict(member.wanted)

    def evict(self, extra: int) -> None:
        """Holder: evict until the fleet's usage + ``extra`` leaves the free target."""
        member = self.member
        over = member.excess(self.capacity.headroom, extra)
        if over <= 0:
            return
        before = self.index.bytes_used
        self._shed(over)
        if before - self.index.bytes_used < over and member.clock() - member.last_sync >= max(
                member.poll_s, member.interval / 5):
            self.sync()  # the rest is in chunks of other engines we have not indexed

    def _shed(self, over: int) -> None:
        """Evict ``over`` bytes from the index with the capacity policy (group-aware)."""
        cap = self.capacity
        cap.budget = max(0, self.index.bytes_used - over)
        try:
            removed = cap.enforce()
        finally:
            cap.budget = self.config.disk_budget
        self.drop(removed, "budget")

    def admit(self, plan: StorePlan) -> None:
        """Keep the admitted chunks the fleet has room for (in plan order); skip the rest."""
        member = self.member
        for i, cand in enumerate(plan.admitted):
            ok = member.admit(cand.size)
            if not ok and member.holder:
                member.unblock()
                self.evict(sum(c.size for c in plan.admitted[i:]))
                ok = member.admit(cand.size)
            if not ok:  # nothing past a chunk that did not fit is worth storing
                for rest in plan.admitted[i:]:
                    self.capacity.abort(rest.key)
                    self.counters.add("fleet_refused", 1, rest.group)
                plan.skipped += plan.admitted[i:]
                del plan.admitted[i:]
                return
            self._reserved[cand.key] = cand.size

    def store_done(self, key: bytes) -> None:
        """A store ended: its reservation leaves the flight; the fleet keeps the file's size."""
        reserved = self._reserved.pop(key, 0)
        try:
            actual = self.store.path(key).stat().st_size
        except OSError:
            actual = 0  # nothing written
        self.member.done(reserved, actual)

    def unlink(self, keys: list[bytes]) -> None:
        """Delete the files of ``keys``; the holder lowers the fleet's usage by what it
        unlinked."""
        freed = 0
        for key in keys:
            try:
                size = self.store.path(key).stat().st_size
            except OSError:
                size = 0
            if self.store.delete(key):
                freed += size
        if self.member.holder:
            self.member.freed(freed)

    def close(self) -> None:
        """Give up the lease and our grant; stop the listing thread."""
        self.member.close()
        self._pool.shutdown(wait=False)
