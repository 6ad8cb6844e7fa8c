"""``DiskFloor``: keep the cache filesystem's free space above ``min_free_space``.

The service asks ``limit(stored, used)`` before each store plan: the bytes its chunk
files (stored + reserved) may reach so that the filesystem keeps ``floor`` bytes
free. The free space comes from ``os.statvfs`` (``f_bavail``), probed at most once
per ``interval`` seconds (a clock read otherwise); between probes the limit stays
``stored_at_probe + free_at_probe - floor``, so this engine's own writes and
evictions are accounted by its index and other writers by the next probe.

Invariants:
- A round (one probe) whose free space is below the floor is ``short``: the service
  stores nothing until the next probe and evicts down to ``limit``, which is never
  below ``used - stored // EVICT_SHARE``: eviction for space is bounded, and a store
  admitted against a current probe never takes the free space below the floor.
- Two short rounds in a row (or two no-space failures within ``NO_SPACE_MEMORY``
  seconds) start a back-off: ``backing_off`` is True for ``delay`` seconds, doubling
  from ``BACKOFF_MIN`` up to ``BACKOFF_MAX``; the service stores nothing and evicts
  nothing meanwhile. Probes go on at ``interval`` during a back-off: one at or above
  the floor (and no no-space failure for ``NO_SPACE_MEMORY`` seconds: a quota is not
  visible to ``statvfs``) ends it and resets the delay, so stores resume within one
  interval of the space coming back.
- ``no_space()`` (a store failed with ENOSPC/EDQUOT) probes now, at most once per
  ``FORCED_MIN`` seconds, and counts the free space as 0 for that round: a quota
  is not visible to ``statvfs``.
- A filesystem whose ``statvfs`` fails gives no limit (``None``), with one warning a
  minute; the engine keeps serving.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from hybridkv.capacity import Capacity, StorePlan
from hybridkv.store.failures import Warnings
from hybridkv.store.free_space import measure

__all__ = ["BACKOFF_MAX", "BACKOFF_MIN", "DiskFloor", "EVICT_SHARE", "PROBE_INTERVAL"]

log = logging.getLogger(__name__)

#: seconds between statvfs probes on the store path
PROBE_INTERVAL = 1.0
#: a short round may evict at most 1/EVICT_SHARE of the bytes stored beyond the next batch
EVICT_SHARE = 8
BACKOFF_MIN, BACKOFF_MAX = 2.0, 60.0
#: seconds a no-space failure is remembered (a second one within them backs off)
NO_SPACE_MEMORY = 60.0
#: seconds between forced probes (``no_space``)
FORCED_MIN = 0.1


class DiskFloor:
    def __init__(self, path: str | os.PathLike, min_free_space: int | str | None, *,
                 clock: Callable[[], float] = time.monotonic,
                 statvfs: Callable[[str], os.statvfs_result] = os.statvfs,
                 interval: float = PROBE_INTERVAL):
        self.path = os.fspath(path)
        self.clock = clock
        self.interval = interval
        self._statvfs = statvfs
        self.warnings = Warnings(log, clock=clock)
        self.setting = min_free_space
        self.total = 0
        self.floor = 0
        #: free bytes at the last probe (None: statvfs failed or never ran)
        self.free: int | None = None
        self.probes = 0
        self.probed_at = float("-inf")  # clock time of the last probe
        self.short_rounds = 0  # probes that found the free space below the floor
        self.backoffs = 0
        self.backoff_until = float("-inf")
        self.delay = BACKOFF_MIN
        self._limit: int | None = None
        self._next_probe = float("-inf")
        self._last_forced = float("-inf")
        self._short_prev = False
        self._last_no_space = float("-inf")

    def limit(self, stored: int, used: int) -> int | None:
        """Bytes this engine's chunks (stored + reserved) may use now (None: no limit known).

        ``stored``: bytes of complete chunk files in the index; ``used``: stored + reserved.
        """
        now = self.clock()
        if now >= self._next_probe:
            self._probe(stored, used, now, no_space=False)
        if now < self.backoff_until:
            return used  # neither grow nor evict while backing off
        return self._limit

    def excess(self, stored: int, used: int) -> int:
        """Bytes to evict now for the floor (0 while backing off or without a limit)."""
        limit = self.limit(stored, used)
        if limit is None or self.backing_off():
            return 0
        return max(0, used - limit)

    @staticmethod
    def trim(plan: StorePlan, capacity: Capacity, limit: int) -> None:
        """Abort the last admitted stores of ``plan`` until the bytes used fit ``limit``."""
        while plan.admitted and capacity.index.bytes_used > limit:
            cand = plan.admitted.pop()
            capacity.abort(cand.key)
            plan.skipped.append(cand)

    def backing_off(self) -> bool:
        """True while stores wait for the filesystem (see the module docstring)."""
        return self.clock() < self.backoff_until

    def no_space(self, stored: int, used: int) -> None:
        """A store failed with ENOSPC/EDQUOT: a round now, counting the free space as 0."""
        now = self.clock()
        if now < self.backoff_until or now - self._last_forced < FORCED_MIN:
            return
        self._last_forced = now
        self._probe(stored, used, now, no_space=True)

    @property
    def short(self) -> bool:
        """The last round found the free space below the floor (or a no-space failure):
        until the next probe the service stores nothing and evicts down to ``limit``."""
        return self._short_prev

    @property
    def below_floor(self) -> bool:
        """The last probe found less free space than the floor."""
        return self.free is not None and self.free < self.floor

    # ------------------------------------------------------------------ rounds
    def _probe(self, stored: int, used: int, now: float, *, no_space: bool) -> None:
        self._next_probe = now + self.interval
        try:
            space = measure(self.path, self.setting, statvfs=self._statvfs)
        except OSError as exc:
            self.warnings.warn("statvfs", "hybridkv: cannot read the free space of %s (%s); "
                               "min_free_space is not enforced until it can", self.path, exc)
            self.free = self._limit = None
            return
        self.probes += 1
        self.probed_at = now
        self.total, self.floor, self.free = space.total, space.floor, space.free
        seen = 0 if no_space else self.free
        short = no_space or seen < self.floor
        limit = stored + seen - self.floor
        backing_off = now < self.backoff_until
        if short and not backing_off:  # (still short during a back-off: it runs on)
            self.short_rounds += 1
            again = self._short_prev or (no_space and now - self._last_no_space
                                         < NO_SPACE_MEMORY)
            if again:
                self.backoff_until = now + self.delay
                self.backoffs += 1
                self.warnings.warn(
                    "backoff", "hybridkv: %s is still %s after eviction (%d KiB free, floor "
                    "%d KiB): no stores for %.0f s", self.path,
                    "refusing writes (no space)" if no_space else "below min_free_space",
                    self.free // 1024, self.floor // 1024, self.delay)
                self.delay = min(self.delay * 2, BACKOFF_MAX)
            else:
                self.warnings.warn(
                    "short", "hybridkv: %s %s (%d KiB free, floor %d KiB): evicting to make "
                    "room", self.path, "has no space left" if no_space else
                    "is below min_free_space", self.free // 1024, self.floor // 1024)
        if short:  # a bounded round; a failed write frees a full round (how short is unknown)
            bound = used - stored // EVICT_SHARE
            limit = bound if no_space else max(limit, bound)
        elif now - self._last_no_space >= NO_SPACE_MEMORY:
            self.delay = BACKOFF_MIN
            self.backoff_until = float("-inf")  # the space is back: stores resume
        if no_space:
            self._last_no_space = now
        self._short_prev = short
        self._limit = limit
