"""Per-group Prometheus metrics through vLLM's own connector-stats path.

vLLM 0.32 registers an offloading spec's metrics from
``OffloadingSpec.build_metric_definitions`` (``HybridKVSpec`` returns
``metric_definitions()``) and feeds them from ``OffloadingConnectorStats``:
the scheduler side's ``OffloadingManager.get_stats`` (``manager_stats``) and
each worker-side connector's ``get_kv_connector_stats`` (``worker_stats``),
which vLLM sums over workers and ships to the API server's ``/metrics``.

Both sides already count in ``hybridkv.stats.Counters`` (what ``hybridkv
stats`` reads); the stats carry what each counter gained since the previous
step (``Counters.take_delta``), relabelled here. ``DiskUsage`` keeps the bytes
and chunk files per group as an index listener, so the gauges cost nothing
per step. The table of names and meanings is in ``docs/metrics.md``.

Invariant: every series a stats payload carries is defined by
``metric_definitions()`` with the same label names (vLLM asserts both).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from vllm.distributed.kv_transfer.kv_connector.v1.offloading.metrics import (
    OffloadingConnectorStats,
)
from vllm.v1.kv_offload.base import (
    OffloadingCounterMetadata,
    OffloadingGaugeMetadata,
    OffloadingMetricMetadata,
)

from hybridkv.groups import HybridLayout
from hybridkv.index import STORED, ChunkIndex
from hybridkv.stats import Counters

__all__ = ["PREFIX", "DiskUsage", "manager_stats", "metric_definitions", "no_space_failures",
           "worker_stats"]

PREFIX = "vllm:kv_offload_hybridkv_"
GROUP = ("group", "kind")

#: per-group counters: hybridkv counter name -> (metric suffix, documentation)
_GROUP_COUNTERS = {
    "lookup_tokens": ("lookup_tokens", "Tokens of the chunks the scheduler looked up in this "
                      "group (a chunk's tokens per lookup; a waiting request looks up again)."),
    "lookup_hit_tokens": ("lookup_hit_tokens", "Tokens of the looked-up chunks this group had "
                          "on disk (the group alone; a hit needs every group)."),
    "chunks_stored": ("stored_chunks", "Chunk files stored (complete on disk)."),
    "bytes_stored": ("stored_bytes", "Bytes of chunk files stored (file sizes)."),
    "chunks_loaded": ("loaded_chunks", "Chunks loaded into the KV cache (verified), summed "
                      "over workers."),
    "bytes_read": ("loaded_bytes", "Payload bytes loaded into the KV cache, summed over "
                   "workers."),
    "stores_not_admitted": ("stores_not_admitted", "Chunks offered for storing that the "
                            "eviction policy refused (could never be served)."),
    "stores_skipped_budget": ("stores_skipped_budget", "Chunks admitted but not stored: no "
                              "room within disk_budget after eviction (or the fleet refused)."),
    "store_failures": ("store_failures", "Chunk writes that failed in a worker (no file is "
                       "left; the chunk is not stored)."),
    "stores_skipped_floor": ("stores_skipped_floor", "Chunks not stored: the filesystem's free "
                             "space would go below min_free_space (after eviction)."),
    "stores_skipped_disk_full": ("stores_skipped_disk_full", "Chunks not stored while "
                                 "hybridkv backs off a filesystem that stays full."),
}
#: per-group counters with one more label: counter name prefix -> (suffix, label, doc)
_LABELLED_COUNTERS = {
    "load_failures_": ("load_failures", "reason", "Chunk loads that failed (the request is "
                       "recomputed), by reason: the error class (ChunkMissing, ChunkCorrupt, "
                       "ChunkUntrusted, ChunkUnreadable, ...)."),
    "store_failures_": ("store_failures_by_cause", "cause", "Chunk writes that failed in a "
                        "worker, by cause: no_space (ENOSPC, EDQUOT), permission (EACCES, "
                        "EPERM), read_only (EROFS), other."),
    "chunks_evicted_": ("evicted_chunks", "cause", "Chunk files deleted, by cause: budget "
                        "(eviction to stay within disk_budget), orphan (its prefix left), "
                        "failed_verification (a load found it bad), gone (deleted or changed "
                        "behind this engine's back), reset (reset_prefix_cache)."),
}
#: hybrid counters (scope "all"), published once per group: name -> (suffix, doc)
_HYBRID_COUNTERS = {
    "tokens_from_disk": ("hit_tokens", "Prompt tokens vLLM loads from disk: the hybrid hit, "
                         "which every group serves (the same value for each group)."),
}
_PLAIN_COUNTERS = {
    "requests_hit": ("requests_hit", "Requests that load a hit from disk."),
    "requests_load_failed": ("requests_load_failed", "Requests whose load failed (recomputed "
                             "or ended, per kv_load_failure_policy)."),
}
_GAUGES = {
    "disk_bytes": (GROUP, "Bytes of chunk files on disk per group, as this engine's index "
                   "knows them (with fleet=on, the whole directory after a sync)."),
    "disk_chunks": (GROUP, "Chunk files on disk per group, as this engine's index knows them."),
    "disk_budget_bytes": ((), "disk_budget in bytes (absent when unbounded)."),
    "fs_free_bytes": ((), "Free bytes of the cache directory's filesystem at the last "
                      "statvfs probe (at most one a second)."),
    "min_free_bytes": ((), "min_free_space in bytes: the free space hybridkv keeps."),
}


def metric_definitions() -> dict[str, OffloadingMetricMetadata]:
    """Every metric hybridkv publishes (``HybridKVSpec.build_metric_definitions``)."""
    defs: dict[str, OffloadingMetricMetadata] = {}
    for suffix, doc in _GROUP_COUNTERS.values():
        defs[PREFIX + suffix] = OffloadingCounterMetadata(doc, GROUP)
    for suffix, label, doc in _LABELLED_COUNTERS.values():
        defs[PREFIX + suffix] = OffloadingCounterMetadata(doc, GROUP + (label,))
    for suffix, doc in _HYBRID_COUNTERS.values():
        defs[PREFIX + suffix] = OffloadingCounterMetadata(doc, GROUP)
    for suffix, doc in _PLAIN_COUNTERS.values():
        defs[PREFIX + suffix] = OffloadingCounterMetadata(doc)
    for suffix, (labels, doc) in _GAUGES.items():
        defs[PREFIX + suffix] = OffloadingGaugeMetadata(doc, labels)
    return defs


def _group_labels(layout: HybridLayout) -> dict[int, tuple[str, str]]:
    return {g.index: (str(g.index), g.kind.value) for g in layout.groups}


def counter_stats(delta: dict[str, dict[str, int]], layout: HybridLayout,
                  stats: OffloadingConnectorStats | None = None) -> OffloadingConnectorStats:
    """``Counters.take_delta()`` as vLLM stats; counters without a metric are left out."""
    stats = stats if stats is not None else OffloadingConnectorStats()
    labels = _group_labels(layout)
    for scope, values in delta.items():
        if scope == "all":
            for name, value in values.items():
                if name in _PLAIN_COUNTERS:
                    stats.increase_counter(PREFIX + _PLAIN_COUNTERS[name][0], value)
                elif name in _HYBRID_COUNTERS:
                    for group_labels in labels.values():
                        stats.increase_counter(PREFIX + _HYBRID_COUNTERS[name][0], value,
                                               group_labels)
            continue
        group_labels = labels.get(int(scope[1:])) if scope[1:].isdigit() else None
        if group_labels is None:
            continue
        for name, value in values.items():
            if name in _GROUP_COUNTERS:
                stats.increase_counter(PREFIX + _GROUP_COUNTERS[name][0], value, group_labels)
                continue
            for prefix, (suffix, _label, _doc) in _LABELLED_COUNTERS.items():
                if name.startswith(prefix) and len(name) > len(prefix):
                    stats.increase_counter(PREFIX + suffix, value,
                                           group_labels + (name[len(prefix):],))
    return stats


class DiskUsage:
    """Bytes and chunk files per group among the index's stored chunks (an index listener)."""

    def __init__(self, index: ChunkIndex):
        self.index = index
        self.bytes: dict[int, int] = defaultdict(int)
        self.chunks: dict[int, int] = defaultdict(int)
        self._count_all()
        index.subscribe(self)

    def _count_all(self) -> None:
        cols = self.index.columns
        n = len(cols.flags)
        stored = (np.frombuffer(cols.flags, dtype=np.uint8, count=n) & STORED) != 0
        groups = np.frombuffer(cols.group, dtype=np.uint16, count=n)[stored]
        sizes = np.frombuffer(cols.size, dtype=np.uint32, count=n)[stored].astype(np.int64)
        for g in np.unique(groups).tolist():
            mask = groups == g
            self.bytes[g] = int(sizes[mask].sum())
            self.chunks[g] = int(mask.sum())

    # index listener
    def on_stored(self, slot: int, completed: bool = False, resized: bool = False) -> None:
        g = self.index.group_of(slot)
        self.bytes[g] += self.index.size_of(slot)
        self.chunks[g] += 1

    def on_absent(self, slot: int) -> None:
        if self.index.is_stored_slot(slot):
            g = self.index.group_of(slot)
            self.bytes[g] -= self.index.size_of(slot)
            self.chunks[g] -= 1

    def on_clear(self) -> None:
        self.bytes.clear()
        self.chunks.clear()

    def on_present(self, slot: int) -> None:
        pass

    def on_touch(self, slot: int, was_spare: bool) -> None:
        pass

    def on_hit(self, slot: int) -> None:
        pass


def manager_stats(counters: Counters, layout: HybridLayout, usage: DiskUsage,
                  budget: int | None, last: dict, *, free: int | None = None,
                  floor: int | None = None) -> OffloadingConnectorStats | None:
    """The scheduler side's stats for one step: counter gains, and the gauges when they
    changed since ``last`` (a dict the caller keeps; Prometheus keeps a gauge's value)."""
    stats = counter_stats(counters.take_delta(), layout)
    gauges = {(PREFIX + "disk_bytes", labels): usage.bytes.get(g, 0)
              for g, labels in _group_labels(layout).items()}
    gauges.update({(PREFIX + "disk_chunks", labels): usage.chunks.get(g, 0)
                   for g, labels in _group_labels(layout).items()})
    if budget is not None:
        gauges[(PREFIX + "disk_budget_bytes", ())] = budget
    if free is not None:
        gauges[(PREFIX + "fs_free_bytes", ())] = free
    if floor is not None:
        gauges[(PREFIX + "min_free_bytes", ())] = floor
    for (name, labels), value in gauges.items():
        if last.get((name, labels)) != value:
            stats.set_gauge(name, value, labels)
            last[(name, labels)] = value
    return None if stats.is_empty() else stats


def worker_stats(worker) -> OffloadingConnectorStats | None:
    """A worker's counter gains since its last report (``HybridKVConnector`` hands them
    to vLLM from ``get_kv_connector_stats`` on the worker side)."""
    counters = getattr(worker, "counters", None)
    store = getattr(worker, "store", None)
    if counters is None or store is None:
        return None
    stats = counter_stats(counters.take_delta(), store.layout)
    return None if stats.is_empty() else stats


def no_space_failures(stats) -> int:
    """Chunk writes that failed for lack of space in the workers' stats of one step
    (``KVConnectorOutput.kv_connector_stats``; 0 for None or another connector's)."""
    data = getattr(stats, "data", None)
    if not isinstance(data, dict):
        return 0
    series = data.get("data", {}).get(PREFIX + "store_failures_by_cause", {})
    return int(sum(v for labels, v in series.items()
                   if tuple(labels)[-1:] == ("no_space",)))
