"""Prefix index of a fleet: which block hashes each replica holds, per tier and group.

Fed by vLLM KV events (``hybridkv.routing.events``), one stream per replica.
An entry is (tier, group, block hash); the tier is the event's ``medium``
(``GPU`` for vLLM's prefix cache, ``CPU`` / ``STORAGE`` for offloaded chunks; a
missing medium is ``GPU``, as vLLM's block pool publishes).

Invariant (*never over-promise*): an entry is present only if the replica
published its store after the last point where the view could have lost a
removal. So the view is always a subset of the replica's true contents:
- a sequence gap (``seq > last + 1``: events dropped), a sequence that goes
  back (``seq <= last``: the publisher restarted), a lost connection
  (``disconnect``: a restart drops it) and ``AllBlocksCleared`` empty the
  replica's view (every tier), counted in ``resets`` with the reason;
- a removal without a group (old publishers) removes the hash from every
  group of its tier; a store without a group is ignored unless the layout has
  one group; a store whose ``kv_cache_spec_kind`` / window contradict the
  configured layout marks the replica *mismatched*: it is answered 0 tokens;
- the view is bounded: at most ``max_entries`` entries per replica, least
  recently stored or hit first out (``evicted`` counts them). Evicting an
  entry can only lower an answer.
A replica seen first mid-stream (``seq > 0``) starts with what it publishes
from then on: it may under-report, never over-report.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import msgspec

from hybridkv.groups import GroupKind, GroupSpec
from hybridkv.routing.events import (MEDIUM_GPU, AllBlocksCleared, BlockRemoved, BlockStored,
                                     KVEventBatch, hash_key)

__all__ = ["PrefixIndex", "ReplicaStatus", "DEFAULT_MAX_ENTRIES", "vllm_kind"]

DEFAULT_MAX_ENTRIES = 1_000_000

#: vLLM's ``kv_cache_spec_kind`` values -> our group kinds
#: (vLLM's ``KVCacheSpecKind``; others, e.g. ``"unknown"``, are not checked)
_VLLM_KINDS = {
    "full_attention": GroupKind.FULL, "mla_attention": GroupKind.FULL,
    "sink_full_attention": GroupKind.FULL, "sliding_window": GroupKind.SLIDING,
    "sliding_window_mla": GroupKind.SLIDING, "chunked_local_attention": GroupKind.SLIDING,
    "mamba": GroupKind.STATE,
}


def vllm_kind(kind: str) -> GroupKind | None:
    return _VLLM_KINDS.get(kind.lower())


class ReplicaStatus(msgspec.Struct, kw_only=True):
    """What the router knows about one replica's stream (served by ``GET /replicas``)."""

    name: str
    connected: bool = False
    last_seq: int | None = None
    batches: int = 0
    entries: int = 0
    evicted: int = 0
    resets: dict[str, int] = msgspec.field(default_factory=dict)
    last_reset: str | None = None
    mismatch: str | None = None
    undecodable: int = 0


class _Replica:
    def __init__(self, name: str) -> None:
        self.status = ReplicaStatus(name=name)
        # key: (tier id, group, 64-bit hash) packed into one int; LRU order
        self.entries: OrderedDict[int, None] = OrderedDict()


def _pack(tier: int, group: int, h: int) -> int:
    return (tier << 96) | (group << 64) | h


class PrefixIndex:
    """Replica name -> bounded set of (tier, group, hash). Thread-safe (one lock)."""

    def __init__(self, groups: Sequence[GroupSpec], max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries <= 0:
            raise ValueError(f"max_entries must be positive, got {max_entries}")
        self.groups = {g.index: g for g in groups}
        self.max_entries = max_entries
        self._tiers: dict[str, int] = {}
        self._replicas: dict[str, _Replica] = {}
        self.lock = threading.RLock()

    # ------------------------------------------------------------------ replicas
    def add_replica(self, name: str) -> None:
        with self.lock:
            self._replicas.setdefault(name, _Replica(name))

    @property
    def replicas(self) -> list[str]:
        return list(self._replicas)

    def status(self, name: str) -> ReplicaStatus:
        with self.lock:
            r = self._replicas[name]
            r.status.entries = len(r.entries)
            return msgspec.structs.replace(r.status, resets=dict(r.status.resets))

    def reset(self, name: str, reason: str) -> None:
        """Empty a replica's view (it can no longer vouch for anything it held)."""
        with self.lock:
            r = self._replicas[name]
            r.entries = OrderedDict()
            r.status.resets[reason] = r.status.resets.get(reason, 0) + 1
            r.status.last_reset = reason

    def set_connected(self, name: str, connected: bool) -> None:
        with self.lock:
            r = self._replicas[name]
            if r.status.connected and not connected:
                self.reset(name, "disconnected")
                r.status.last_seq = None
            r.status.connected = connected

    def note_undecodable(self, name: str) -> None:
        """A message that did not decode is a lost batch."""
        with self.lock:
            self._replicas[name].status.undecodable += 1
            self.reset(name, "undecodable")

    # ------------------------------------------------------------------ events
    def _tier(self, medium: str | None) -> int:
        medium = medium or MEDIUM_GPU
        tid = self._tiers.get(medium)
        if tid is None:
            tid = self._tiers[medium] = len(self._tiers)
        return tid

    def apply(self, name: str, seq: int, batch: KVEventBatch) -> None:
        """Apply one batch numbered ``seq`` from replica ``name``."""
        with self.lock:
            r = self._replicas[name]
            last = r.status.last_seq
            if last is not None:
                if seq <= last:
                    self.reset(name, "restart")
                elif seq > last + 1:
                    self.reset(name, "gap")
            r.status.last_seq = seq
            r.status.batches += 1
            for ev in batch.events:
                if isinstance(ev, BlockStored):
                    self._stored(r, ev)
                elif isinstance(ev, BlockRemoved):
                    self._removed(r, ev)
                elif isinstance(ev, AllBlocksCleared):
                    self.reset(name, "all_blocks_cleared")

    def _check_spec(self, r: _Replica, ev: BlockStored, group: int) -> bool:
        g = self.groups.get(group)
        if g is None:
            r.status.mismatch = f"group {group} is not in the layout"
            return False
        if ev.kv_cache_spec_kind is not None:
            kind = vllm_kind(ev.kv_cache_spec_kind)
            if kind is not None and kind is not g.kind:
                r.status.mismatch = (f"group {group} is {ev.kv_cache_spec_kind} in its events, "
                                     f"{g.kind.value} in the layout")
                return False
        if (ev.kv_cache_spec_sliding_window is not None and g.kind is GroupKind.SLIDING
                and ev.kv_cache_spec_sliding_window != g.window_tokens):
            r.status.mismatch = (f"group {group} has window {ev.kv_cache_spec_sliding_window} "
                                 f"in its events, {g.window_tokens} in the layout")
            return False
        return True

    def _stored(self, r: _Replica, ev: BlockStored) -> None:
        group = ev.group_idx
        if group is None:
            if len(self.groups) != 1:
                return
            group = next(iter(self.groups))
        if not self._check_spec(r, ev, group):
            return
        tier = self._tier(ev.medium)
        entries = r.entries
        for h in ev.block_hashes:
            key = _pack(tier, group, hash_key(h))
            entries[key] = None
            entries.move_to_end(key)
        over = len(entries) - self.max_entries
        for _ in range(max(0, over)):
            entries.popitem(last=False)
            r.status.evicted += 1

    def _removed(self, r: _Replica, ev: BlockRemoved) -> None:
        tier = self._tier(ev.medium)
        groups = self.groups if ev.group_idx is None else (ev.group_idx,)
        for h in ev.block_hashes:
            hk = hash_key(h)
            for group in groups:
                r.entries.pop(_pack(tier, group, hk), None)

    # ------------------------------------------------------------------ queries
    def holds(self, name: str, medium: str, group: int, block_hash: int) -> bool:
        """Does the view hold this entry? (No LRU touch; ``touch`` does that.)"""
        tid = self._tiers.get(medium)
        if tid is None:
            return False
        return _pack(tid, group, block_hash) in self._replicas[name].entries

    def touch(self, name: str, medium: str, group: int, block_hash: int) -> None:
        tid = self._tiers.get(medium)
        if tid is not None:
            key = _pack(tid, group, block_hash)
            entries = self._replicas[name].entries
            if key in entries:
                entries.move_to_end(key)

    def mismatch(self, name: str) -> str | None:
        return self._replicas[name].status.mismatch

    @property
    def tiers(self) -> list[str]:
        return list(self._tiers)
