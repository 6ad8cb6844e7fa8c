"""Capacity: keep the bytes on disk inside the budget, with a pluggable policy.

``Capacity`` is the one place where admission, reservation, eviction and
orphan reclaim happen. The vLLM manager and the simulator both drive it, so
the policy code that runs in production is the code the simulator measures.
It never touches files: it returns the keys to delete, and the caller deletes
them (the manager) or just forgets them (the simulator).

Invariants:
- ``index.bytes_used`` (stored + reserved) never exceeds the budget because of
  ``plan_store``: a chunk that does not fit after eviction is skipped;
  ``commit`` evicts again if a file came out larger than its reservation.
- Pinned chunks (being loaded) are never removed; chunks of requests still
  storing (``open`` requests) are never chosen as victims, by eviction or by
  a policy's cleaner.
- With a policy that names spine groups (full attention), a chunk offered at or
  past a spine chunk that did not fit is skipped too: it could never be hit.
- With a policy that reclaims orphans, removing a chunk also removes every
  stored chunk that can no longer be part of any hit because of it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from hybridkv.index import ChunkIndex
from hybridkv.keys import key_group
from hybridkv.policies.base import Admission, Candidate, CapacityPolicy, RequestView

__all__ = ["Capacity", "StorePlan", "DEFAULT_HEADROOM"]

#: fraction of the budget freed beyond the shortfall when eviction runs: a policy's
#: victim search costs time linear in the stored chunks, so it should run rarely
DEFAULT_HEADROOM = 0.02


@dataclass(slots=True)
class StorePlan:
    admitted: list[Candidate] = field(default_factory=list)
    evicted: list[bytes] = field(default_factory=list)
    rejected: list[Candidate] = field(default_factory=list)  # the policy said no
    skipped: list[Candidate] = field(default_factory=list)  # no room left in the budget


class Capacity:
    def __init__(self, index: ChunkIndex, policy: CapacityPolicy, budget: int | None = None,
                 *, headroom: float = DEFAULT_HEADROOM):
        if not 0.0 <= headroom < 1.0:
            raise ValueError(f"headroom must be in [0, 1), got {headroom}")
        self.index = index
        self.policy = policy
        self.budget = budget
        self.headroom_fraction = headroom
        #: bytes freed beyond the shortfall when eviction runs, so it runs rarely
        self.headroom = int(budget * headroom) if budget is not None else 0
        #: how many times the policy was asked for victims on the store path
        self.victim_calls = 0
        #: keys ``remove`` took as orphans of others, for a caller that counts eviction
        #: causes and empties it (None, the default: not kept)
        self.orphans: set[bytes] | None = None
        self._open: dict[str, set[bytes]] = {}
        policy.attach(index)

    def set_budget(self, budget: int | None) -> None:
        """A new budget (the service's free-space floor moves it); the headroom follows."""
        if budget != self.budget:
            self.budget = budget
            self.headroom = int(budget * self.headroom_fraction) if budget is not None else 0

    # ------------------------------------------------------------------ loads
    def load(self, keys: Sequence[bytes]) -> None:
        """Chunks of one hit are about to be read: pin them (never evicted) and tell the policy."""
        for key in keys:
            self.index.pin(key)
        self.policy.on_load(keys, self.index)

    def load_done(self, keys: Iterable[bytes]) -> None:
        """The reads of ``load`` finished (or failed): unpin."""
        for key in keys:
            self.index.unpin(key)

    def offer(self, batch: Sequence[Candidate], request: RequestView) -> StorePlan:
        """Chunks the engine offers to store: ``plan_store`` (the name the callers read)."""
        return self.plan_store(batch, request)

    # ------------------------------------------------------------------ stores
    def plan_store(self, batch: Sequence[Candidate], request: RequestView) -> StorePlan:
        """Decide which offered chunks to write; reserve their bytes; evict to make room.

        When eviction runs it frees ``headroom`` bytes beyond the need (from any chunk
        for admitted candidates, from chunks worth less than a spare one otherwise).
        """
        plan = StorePlan()
        verdicts = self.policy.admit(batch, request, self.index)
        # admitted chunks first (prefix order), then spare ones into what room is left,
        # deepest first: later requests resume most often just short of where this one ends
        spine = self.policy.spine_groups
        order = sorted(range(len(batch)), key=lambda i: (
            -verdicts[i],
            -batch[i].position if verdicts[i] is Admission.SPARE else batch[i].position,
            batch[i].group not in spine))
        wanted = [i for i in order if verdicts[i] is not Admission.REJECT]
        plan.rejected = [batch[i] for i in order if verdicts[i] is Admission.REJECT]
        if self.budget is not None:
            need = sum(batch[i].size for i in wanted if verdicts[i] is Admission.ADMIT)
            spare = sum(batch[i].size for i in wanted if verdicts[i] is Admission.SPARE)
            short = self.index.bytes_used + need - self.budget
            extra = min(spare, self.index.bytes_used + need + spare - self.budget)
            if short > 0 or extra > 0:
                protect = self._protected(request)
                self.victim_calls += 1
                if short > 0:
                    short += self.headroom
                else:
                    extra += self.headroom
                plan.evicted = self.remove(self.policy.victims(
                    self.index, max(0, short), protect, expendable=max(0, extra)))
        opened = self.open_request(request)
        cut = None  # a full-attention chunk here did not fit: nothing at or past it can hit
        for i in wanted:
            cand = batch[i]
            if cut is not None and cand.position >= cut:
                plan.skipped.append(cand)
                continue
            if self.budget is not None and self.index.bytes_used + cand.size > self.budget:
                plan.skipped.append(cand)
                if cand.group in spine:
                    cut = cand.position
                continue
            self.index.reserve(cand.key, cand.size, position=cand.position, parent=cand.parent,
                               spare=verdicts[i] is Admission.SPARE)
            opened.add(cand.key)
            plan.admitted.append(cand)
        return plan

    def open_request(self, request: RequestView) -> set[bytes]:
        """``request`` is storing: until ``request_finished`` its chunks are never chosen
        as victims (``plan_store`` opens it too; a caller that may evict before it calls
        ``plan_store``, e.g. for the fleet, opens it first). Returns its protected keys."""
        opened = self._open.setdefault(request.request_id, set())
        opened.update(request.positions)
        return opened

    def commit(self, key: bytes, *, size: int, position: int,
               parent: bytes | None, mtime_ns: int = 0) -> list[bytes]:
        """A reserved chunk is complete on disk. Returns keys evicted to stay in budget."""
        self.index.add(key, group=key_group(key), position=position, size=size, parent=parent,
                       mtime_ns=mtime_ns)
        return self.enforce()

    def abort(self, key: bytes) -> None:
        """A reserved chunk was not written."""
        self.index.release(key)

    def enforce(self) -> list[bytes]:
        """Evict what the budget or the policy's cleaner requires now."""
        if self.budget is None:
            return []
        removed = self.remove(self.policy.cleanup(self.index, self.budget,
                                                  self._protected(None)))
        over = self.index.bytes_used - self.budget
        if over > 0:
            removed += self.remove(self.policy.victims(self.index, over, self._protected(None)))
        return removed

    def request_finished(self, request_id: str) -> None:
        self._open.pop(request_id, None)

    # ------------------------------------------------------------------ removal
    def remove(self, keys: Iterable[bytes]) -> list[bytes]:
        """Forget ``keys`` (and, per policy, the orphans they leave); returns what went."""
        removed: list[bytes] = []
        todo = deque(keys)
        asked = len(todo)  # the rest of ``todo`` are orphans
        while todo:
            key = todo.popleft()
            asked -= 1
            entry = self.index.get(key)
            if entry is None or entry.pins:
                continue
            todo.extend(self.policy.orphans_of(self.index, key))
            self.index.remove(key)
            removed.append(key)
            if asked < 0 and self.orphans is not None:
                self.orphans.add(key)
        return removed

    def _protected(self, request: RequestView | None) -> set[bytes]:
        keys: set[bytes] = set()
        for opened in self._open.values():
            keys |= opened
        if request is not None:
            keys.update(request.positions)
        return keys
