"""Where each KV-cache group's bytes sit in one slot of vLLM's CPU tier.

vLLM's CPU offloading worker carves each slot (one row of the shared CPU region)
into one area per distinct GPU KV tensor: layers of different groups that alias the
same GPU bytes share one, in the order the groups' layers first name them, each
``page * blocks_per_chunk`` bytes. A key of group g fills, for each layer of g,
``blocks_per_chunk`` sub-blocks of that layer's un-padded page at ``area + j * page``.
vLLM sizes every slot for all tensors (vLLM issue 56871), so a group with fewer
layers, or with pages padded to another group's size (Mamba state next to
attention), leaves part of its slot unused: hybridkv stores only the group's bytes.

Invariants:
- ``SlotLayout.from_vllm`` mirrors that carving from the scheduler's ``KVCacheConfig``
  and refuses (``ConfigError``) what it cannot mirror: packed layouts, the canonical
  layout, several workers per slot, a slot smaller than the areas.
- ``gather(row, g)`` returns the arrays ``ChunkStore.write`` stores for group g
  (uint8[blocks_per_chunk, page_bytes] per layer, in the group's layer order);
  ``scatter`` checks every array's shape before it writes any, and writes only into
  the group's bytes.
"""

from __future__ import annotations

import dataclasses

import msgspec
import numpy as np
from numpy.lib.stride_tricks import as_strided
from vllm.v1.kv_cache_interface import (
    AttentionSpec,
    KVCacheConfig,
    MambaSpec,
    UniformTypeKVCacheSpecs,
)
from vllm.v1.kv_offload.config import OffloadingConfig

from hybridkv.config import ConfigError
from hybridkv.groups import HybridLayout

__all__ = ["LayerSpan", "SlotLayout"]


class LayerSpan(msgspec.Struct, frozen=True):
    """One layer's bytes in a slot: ``blocks`` runs of ``nbytes`` every ``stride``."""

    offset: int
    stride: int
    nbytes: int
    blocks: int


class SlotLayout(msgspec.Struct, frozen=True):
    slot_bytes: int
    #: group id -> its layers' spans, in the group's layer order
    spans: dict[int, tuple[LayerSpan, ...]]

    def group_bytes(self, group: int) -> int:
        """Bytes of a slot that belong to ``group``."""
        return sum(s.nbytes * s.blocks for s in self.spans[group])

    def gather(self, row: np.ndarray, group: int) -> list[np.ndarray]:
        """Views of ``group``'s bytes in ``row`` (one slot, uint8)."""
        return [_view(row, s) for s in self.spans[group]]

    def scatter(self, row: np.ndarray, group: int, arrays: list[np.ndarray],
                block_offset: int = 0) -> None:
        """Write a chunk's arrays (as ``gather`` returns them, possibly fewer blocks,
        starting at ``block_offset``) into ``row``; ValueError, nothing written, if
        they do not fit."""
        spans = self.spans[group]
        if len(arrays) != len(spans):
            raise ValueError(f"group {group}: {len(arrays)} arrays for {len(spans)} layers")
        for a, s in zip(arrays, spans):
            if a.ndim != 2 or a.shape[1] != s.nbytes or block_offset + a.shape[0] > s.blocks:
                raise ValueError(f"group {group}: array {list(a.shape)} at block "
                                 f"{block_offset} does not fit {s.blocks} x {s.nbytes} bytes")
        for a, s in zip(arrays, spans):
            _view(row, s)[block_offset:block_offset + a.shape[0]] = a

    @classmethod
    def from_vllm(cls, config: OffloadingConfig, kv_cache_config: KVCacheConfig,
                  layout: HybridLayout, slot_bytes: int) -> SlotLayout:
        if config.parallel.world_size != 1:
            raise ConfigError(
                f"HybridKVTier: world size {config.parallel.world_size} (tensor / pipeline "
                "parallel) is not supported yet; use the direct spec (kv_transfer_config) "
                "or one GPU per engine")
        if config.canonical_layout:
            raise ConfigError("HybridKVTier: canonical_layout is not supported; remove it "
                              "from kv_connector_extra_config")
        placed = _layer_places(kv_cache_config)
        bpc = config.cache.blocks_per_chunk
        areas: dict[tuple[int, int], int] = {}  # (address, block stride) -> offset in slot
        end = 0
        spans: dict[int, tuple[LayerSpan, ...]] = {}
        for g in config.groups:
            group_spec = kv_cache_config.kv_cache_groups[g.group_id].kv_cache_spec
            want = layout.group(g.group_id).page_bytes
            layer_spans = []
            for name in g.layer_names:
                spec = _layer_spec(group_spec, name)
                page = int(spec.page_size_bytes)
                address, block_stride = placed[name]
                if block_stride != page:
                    raise ConfigError(
                        f"HybridKVTier: layer {name} has a packed KV layout (block stride "
                        f"{block_stride} != page {page} bytes), which it cannot store yet")
                nbytes = _unpadded(spec)
                if nbytes != want:
                    raise ConfigError(f"HybridKVTier: layer {name} holds {nbytes} bytes per "
                                      f"block, its group {want}")
                area = areas.get((address, block_stride))
                if area is None:
                    area = areas[(address, block_stride)] = end
                    end += page * bpc
                layer_spans.append(LayerSpan(area, page, nbytes, bpc))
            spans[g.group_id] = tuple(layer_spans)
        if end > slot_bytes:
            raise ConfigError(f"HybridKVTier: the KV tensors need {end} bytes per CPU slot, "
                              f"vLLM's slots have {slot_bytes}")
        return cls(slot_bytes=slot_bytes, spans=spans)


def _layer_places(kv_cache_config: KVCacheConfig) -> dict[str, tuple[int, int]]:
    """layer name -> (byte address of its block 0, block stride) in the KV allocation."""
    places = {}
    for t in kv_cache_config.kv_cache_tensors:
        for i, name in enumerate(t.layers):
            places[name] = (t.offset + i * t.layer_stride, t.block_stride)
    return places


def _layer_spec(group_spec, name: str):
    if isinstance(group_spec, UniformTypeKVCacheSpecs):
        return group_spec.kv_cache_specs[name]
    return group_spec


def _unpadded(spec) -> int:
    """The bytes vLLM's worker copies per block of one layer (its un-padded page)."""
    if isinstance(spec, AttentionSpec):
        return int(spec.unpadded_page_size_bytes)
    if isinstance(spec, MambaSpec):
        return int(dataclasses.replace(spec, page_size_padded=None).page_size_bytes)
    raise ConfigError(f"HybridKVTier: unsupported KV cache spec {type(spec).__name__}")


def _view(row: np.ndarray, s: LayerSpan) -> np.ndarray:
    end = s.offset + (s.blocks - 1) * s.stride + s.nbytes
    if end > row.shape[0]:
        raise ValueError(f"slot of {row.shape[0]} bytes is too small for a span ending at {end}")
    return as_strided(row[s.offset:], shape=(s.blocks, s.nbytes), strides=(s.stride, 1))
