"""``HybridKVSpec``: the vLLM ``OffloadingSpec`` that builds hybridkv's manager and worker.

vLLM hands a spec only the group sizes and layer names; hybridkv also needs
each group's kind (full / sliding window / state) and window. The
``HybridKVConnector`` passes vLLM's ``KVCacheConfig`` in through
``kv_cache_config_context`` while vLLM constructs the spec.

Every store's file I/O is a plain ``FileIO`` built from the settings
(``_file_io``); nothing in the environment changes it. The fault-injection
suite subclasses the spec in ``hybridkv.testing.connector``.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator

from vllm.v1.kv_cache_interface import KVCacheConfig
from vllm.v1.kv_offload.base import (
    CanonicalKVCaches,
    OffloadingManager,
    OffloadingSpec,
    OffloadingWorker,
)
from vllm.v1.kv_offload.config import OffloadingConfig

from hybridkv.config import ConfigError, HybridKVConfig
from hybridkv.cost import PrefillCost
from hybridkv.policies import make_policy
from hybridkv.stats import Counters
from hybridkv.store.chunk_store import ChunkStore
from hybridkv.store.failures import NO_SPACE, failure_cause
from hybridkv.store.fileio import FileIO
from hybridkv.store.format import ChunkTooNew
from hybridkv.vllm.events import ChunkEvents, group_event_specs
from hybridkv.vllm.layout import layout_from_vllm
from hybridkv.vllm.metrics import metric_definitions

log = logging.getLogger(__name__)

__all__ = ["HybridKVSpec", "handed_kv_cache_config", "kv_cache_config_context", "make_policy_for",
           "open_store"]

_KV_CACHE_CONFIG: contextvars.ContextVar[tuple[KVCacheConfig, int | None] | None] = (
    contextvars.ContextVar("hybridkv_kv_cache_config", default=None))


@contextlib.contextmanager
def kv_cache_config_context(kv_cache_config: KVCacheConfig, *,
                            hidden_size: int | None = None) -> Iterator[None]:
    """Hand vLLM's KV-cache config (and the model width, for the cost model) to the spec."""
    token = _KV_CACHE_CONFIG.set((kv_cache_config, hidden_size))
    try:
        yield
    finally:
        _KV_CACHE_CONFIG.reset(token)


def handed_kv_cache_config() -> tuple[KVCacheConfig, int | None] | None:
    """(KV-cache config, model width) handed in by ``HybridKVConnector``, or None."""
    return _KV_CACHE_CONFIG.get()


def open_store(c: HybridKVConfig, layout, rank: int, *, io: FileIO | None = None) -> ChunkStore:
    """The chunk store of ``layout`` under ``c.cache_dir``, checked writable; ConfigError
    naming the directory otherwise. ``io``: a plain ``FileIO`` from the settings."""
    io = io or FileIO(c.durability, c.file_mode, c.dir_mode)
    store = ChunkStore(c.cache_path, layout, rank=rank, io=io, io_mode=c.io_mode,
                       integrity_key=c.integrity_key)
    try:
        store.ensure_dirs()
        store.check_writable()
    except ChunkTooNew as exc:
        raise too_new(store, exc) from exc
    except OSError as exc:
        if failure_cause(exc) == NO_SPACE:  # a full disk is no configuration error:
            log.warning(  # serve what is there; stores wait for free space (DiskFloor)
                "hybridkv: the filesystem of %s is full (%s): starting anyway; chunks "
                "are stored again once there is free space above min_free_space",
                store.paths.layout_dir, exc)
            return store
        raise ConfigError(
            f"cache_dir: cannot write chunks under {store.paths.layout_dir}: {exc}; "
            "choose a writable directory or fix its permissions") from exc
    return store


def make_policy_for(c: HybridKVConfig, layout, hidden_size: int | None):
    """The eviction policy the settings name, with the layout's prefill cost model."""
    cost = PrefillCost.from_layout(layout, hidden_size=hidden_size or 4096)
    return make_policy(c.eviction_policy, layout, cost=cost,
                       checkpoint_interval=c.checkpoint_interval)


class HybridKVSpec(OffloadingSpec):
    @classmethod
    def build_metric_definitions(cls, extra_config):
        # per-group metrics (``hybridkv.vllm.metrics``; names in docs/metrics.md)
        return {**super().build_metric_definitions(extra_config), **metric_definitions()}

    def __init__(self, config: OffloadingConfig):
        super().__init__(config)
        handed = _KV_CACHE_CONFIG.get()
        if handed is None:
            raise ConfigError(
                "HybridKVSpec must be loaded through HybridKVConnector: set "
                "kv_connector='HybridKVConnector' and "
                "kv_connector_module_path='hybridkv.vllm.connector'")
        kv_cache_config, self.hidden_size = handed
        self.hkv_config = HybridKVConfig.from_extra_config(self.extra_config)
        self.hkv_config.check_directory()
        self.layout = layout_from_vllm(config, kv_cache_config)
        self.group_ids = [g.group_id for g in config.groups]
        self.event_groups = group_event_specs(
            kv_cache_config, {g.index: g.chunk_tokens for g in self.layout.groups})
        self._manager: OffloadingManager | None = None

    def _file_io(self) -> FileIO:
        """The I/O layer of each store: the settings alone decide it."""
        c = self.hkv_config
        return FileIO(c.durability, c.file_mode, c.dir_mode)

    def _store(self, rank: int) -> ChunkStore:
        return open_store(self.hkv_config, self.layout, rank, io=self._file_io())

    def get_manager(self) -> OffloadingManager:
        if self._manager is None:
            from hybridkv.vllm.manager import HybridKVManager

            store = self._store(0)
            try:
                self._manager = HybridKVManager(
                    store, self.hkv_config,
                    policy=self._make_policy(),
                    counters=Counters(store.paths.stats_dir, "manager", io=store.io),
                    emit_events=self.kv_events_config.enable_kv_cache_events,
                    chunk_events=ChunkEvents(self.event_groups),
                )
            except ChunkTooNew as exc:  # the startup scan met a chunk from a newer hybridkv
                raise too_new(store, exc) from exc
        return self._manager

    def _make_policy(self):
        return make_policy_for(self.hkv_config, self.layout, self.hidden_size)

    def get_worker(self, kv_caches: CanonicalKVCaches) -> OffloadingWorker:
        from hybridkv.vllm.worker import HybridKVWorker

        rank = self.config.parallel.rank
        store = self._store(rank)
        return HybridKVWorker(
            store, kv_caches, self.group_ids, blocks_per_chunk=self.blocks_per_chunk,
            io_threads=self.hkv_config.io_threads,
            counters=Counters(store.paths.stats_dir, f"worker{rank}", io=store.io),
        )


def too_new(store: ChunkStore, exc: ChunkTooNew) -> ConfigError:
    return ConfigError(
        f"cache_dir: {store.paths.layout_dir} was written by a newer hybridkv ({exc}); "
        "upgrade hybridkv (pip install -U hybridkv) to use it, or set cache_dir to "
        "another directory")
