"""``Lookups``: "is this key's file there to load?", for one ``CacheService``.

Invariants:
- ``lookup`` is True only for keys whose file is complete: in the index (and,
  where ``Presence`` says so, confirmed on disk) or found on disk by a refresh
  after a miss (another engine's store).
- ``lookup_cached`` does no I/O: it answers from memory, or None where only the disk
  can tell (``lookup`` then must run off the caller's hot thread); like ``lookup`` it
  is True only where ``lookup`` would be. With ``count=False`` it reads only what a
  concurrent writer cannot break (one dict get, one bytearray item, set and dict
  membership): another thread may call it while the service's owner works, and a
  stale answer is a lost hit or a load that fails closed, never wrong bytes.
- Every counted lookup is tallied once by the key's last byte (the low byte of the
  group index: groups g and g + 256 would be counted together); ``fold`` moves the
  tallies into the counters as tokens per group.
"""

from __future__ import annotations

from collections.abc import Callable

from hybridkv.cache.presence import Presence, Verdict
from hybridkv.index import ChunkIndex
from hybridkv.keys import key_group
from hybridkv.stats import Counters

__all__ = ["Lookups"]

#: ``forget(key, counter)``: the key's file is gone; drop it and count it under ``counter``
Forget = Callable[[bytes, str], None]


class Lookups:
    def __init__(self, index: ChunkIndex, presence: Presence, counters: Counters,
                 chunk_tokens: dict[int, int], *, forget: Forget,
                 tick: Callable[[], None] | None = None):
        self.index = index
        self.presence = presence
        self.counters = counters
        self.chunk_tokens = chunk_tokens
        self.forget = forget
        self.tick = tick  # the fleet's heartbeat, due on the lookup path
        self._looked_up = [0] * 256  # lookups since the last fold
        self._found = [0] * 256  # of those, HITs

    def lookup(self, key: bytes) -> bool:
        """Is ``key``'s file there to load? The scheduler's hot path: one index probe
        unless a disk check is due (``Presence``)."""
        self._looked_up[key[-1]] += 1
        if self.tick is not None:
            self.tick()
        if self.index.is_stored(key):
            presence = self.presence
            if presence.stored_can_vanish and not presence.confirm(key):
                self.forget(key, "fleet_vanished")
                return False
            if presence.unchecked and key in presence.unchecked and not self._recheck(key):
                return False
        elif not self.refresh(key):
            return False
        self._found[key[-1]] += 1
        return True

    def lookup_cached(self, key: bytes, *, count: bool = True) -> bool | None:
        """``lookup`` without I/O: True / False where memory tells, None where ``lookup``
        would stat or read the disk (a restored key's first HIT, a fleet key's confirm,
        a miss due a look for another engine's file). Counts what it answers, if ``count``."""
        presence = self.presence
        if self.index.is_stored(key):
            if ((presence.stored_can_vanish and presence.confirm_due(key))
                    or (presence.unchecked and key in presence.unchecked)):
                return None
            if count:
                self._looked_up[key[-1]] += 1
                self._found[key[-1]] += 1
            return True
        if not self.index.is_pending(key) and presence.look_due(key):
            return None
        if count:
            self._looked_up[key[-1]] += 1
        return False

    def refresh(self, key: bytes, *, now_or_never: bool = False) -> bool:
        """Pick up a chunk another engine stored (``Presence.look_for``)."""
        if self.index.is_pending(key):
            return False
        record = self.presence.look_for(key, now_or_never=now_or_never)
        if record is None:
            return False
        self.index.load([record])
        self.counters.add("refresh_found", 1, record.group)
        return True

    def fold(self) -> None:
        """Move the lookup tallies into the counters, as tokens per group."""
        if not any(self._looked_up):
            return
        for name, tally in (("lookup_tokens", self._looked_up),
                            ("lookup_hit_tokens", self._found)):
            for group, tokens in self.chunk_tokens.items():
                n, tally[group & 0xFF] = tally[group & 0xFF], 0
                if n:
                    self.counters.add(name, n * tokens, group)

    def _recheck(self, key: bytes) -> bool:
        """First HIT of a key restored from the snapshot; True if it may still HIT."""
        entry = self.index.get(key)
        verdict, record = self.presence.recheck(key, entry.size, entry.mtime_ns,
                                                entry.position, entry.parent)
        if verdict is Verdict.CHANGED:  # rewritten since the snapshot: index what is there now
            self.index.remove(key)
            self.index.load([record])
            self.counters.add("restored_chunks_changed", 1, key_group(key))
        elif verdict is Verdict.RESTORED_GONE:
            self.forget(key, "restored_chunks_gone")
            return False
        return True
