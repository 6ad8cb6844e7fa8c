"""KV events for routers: hybridkv's stores and removals, each tagged with its group.

vLLM's offloading connector turns the manager's ``OffloadingEvent`` s into
``BlockStored`` / ``BlockRemoved`` events; without its opt-in
``self_describing_kv_events`` (and, even with it, for sliding-window and state
groups) a ``BlockStored`` is a placeholder: the chunk's block hash and
``group_idx`` only. ``ChunkEvents.describe`` fills in what a router needs to
tell which groups hold a prefix: ``kv_cache_spec_kind`` and
``kv_cache_spec_sliding_window`` (the values vLLM's own GPU events carry for
the group), ``parent_block_hash`` (the chunk this one extends) and
``block_size`` (tokens per chunk: one hash per chunk). Fields vLLM already set
are left as they are.

Invariants:
- Every hybridkv event has ``medium == "STORAGE"`` and the ``group_idx`` of its
  chunk's key; a ``BlockStored`` also has the group's kind and window.
- A chunk's ``BlockStored`` is taken in the same step as or before its
  ``BlockRemoved`` (the manager queues both in order).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import msgspec
from vllm.distributed.kv_events import MEDIUM_STORAGE, BlockStored, KVCacheEvent
from vllm.v1.core.kv_cache_utils import BlockHash, maybe_convert_block_hash
from vllm.v1.kv_cache_interface import (
    KVCacheConfig,
    get_kv_cache_spec_kind,
    get_kv_cache_spec_sliding_window,
)
from vllm.v1.kv_offload.base import get_offload_block_hash

from hybridkv.keys import key_group

__all__ = ["ChunkEvents", "GroupEventSpec", "group_event_specs"]


class GroupEventSpec(NamedTuple):
    """What a ``BlockStored`` says about its group (vLLM's spellings)."""

    kind: str
    sliding_window: int | None
    chunk_tokens: int


def group_event_specs(kv_cache_config: KVCacheConfig,
                      chunk_tokens: dict[int, int]) -> dict[int, GroupEventSpec]:
    """Per offloaded group index: vLLM's kind and window for it, and tokens per chunk."""
    specs = {}
    for index, tokens in chunk_tokens.items():
        spec = kv_cache_config.kv_cache_groups[index].kv_cache_spec
        specs[index] = GroupEventSpec(get_kv_cache_spec_kind(spec).value,
                                      get_kv_cache_spec_sliding_window(spec), tokens)
    return specs


class ChunkEvents:
    """Remembers each stored chunk's parent until its event is described."""

    def __init__(self, groups: dict[int, GroupEventSpec]):
        self.groups = groups
        # (event hash of the chunk, group) -> event hash of its parent chunk
        self._parents: dict[tuple, object] = {}

    def note_stored(self, key: bytes, parent: bytes | None) -> None:
        """The manager queued a stored event for ``key`` (which extends ``parent``)."""
        if parent is None:
            return
        if len(self._parents) > 1_000_000:  # events not taken (cannot happen in vLLM)
            self._parents.clear()
        self._parents[(_event_hash(key), key_group(key))] = _event_hash(parent)

    def describe(self, events: Iterable[KVCacheEvent]) -> list[KVCacheEvent]:
        """``events`` with every STORAGE ``BlockStored`` of a known group filled in."""
        out = []
        for event in events:
            if (isinstance(event, BlockStored) and event.medium == MEDIUM_STORAGE
                    and event.group_idx in self.groups and event.block_hashes):
                event = self._fill(event)
            out.append(event)
        return out

    def _fill(self, event: BlockStored) -> BlockStored:
        group = self.groups[event.group_idx]
        changes = {}
        if event.kv_cache_spec_kind is None:
            changes["kv_cache_spec_kind"] = group.kind
            changes["kv_cache_spec_sliding_window"] = group.sliding_window
        if event.block_size == 0 and len(event.block_hashes) == 1:
            changes["block_size"] = group.chunk_tokens
        parent = self._parents.pop((event.block_hashes[-1], event.group_idx), None)
        if event.parent_block_hash is None and parent is not None:
            changes["parent_block_hash"] = parent
        return msgspec.structs.replace(event, **changes) if changes else event


def _event_hash(key: bytes):
    """A chunk key's block hash as vLLM publishes it (bytes, or an int with
    ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``)."""
    return maybe_convert_block_hash(BlockHash(get_offload_block_hash(key)))
