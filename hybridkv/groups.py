"""The vocabulary of a hybrid model's KV cache: group kinds, group specs, layouts.

A *group* is one vLLM KV-cache group: layers that share a block table and a
rule for which past tokens they need. hybridkv keeps groups apart everywhere:
each has its own chunk size, window, eviction rule and directory on disk.

Invariants:
- ``HybridLayout.fingerprint`` is a pure function of everything that changes
  the bytes of a stored chunk (model, dtype, group specs, parallel config,
  rank). Two engines share stored chunks iff their fingerprints are equal.
- Groups are ordered by their vLLM group id; ``GroupSpec.index`` is that id.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import msgspec
import xxhash

__all__ = ["GroupKind", "GroupSpec", "HybridLayout", "ParallelSpec"]


class GroupKind(str, enum.Enum):
    """What a group's layers need from the past to serve a hit at position p."""

    #: every token before p (the whole prefix)
    FULL = "full_attention"
    #: only the last ``window_tokens`` tokens before p (chunked-local attention too)
    SLIDING = "sliding_window"
    #: one recurrent state exactly at p (Mamba, gated delta net, linear attention)
    STATE = "state"


class GroupSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One KV-cache group as hybridkv stores it.

    ``page_bytes`` is the un-padded bytes one engine block holds for ONE layer.
    ``window_tokens`` is set for SLIDING groups only.
    """

    index: int
    kind: GroupKind
    block_tokens: int
    chunk_tokens: int
    layer_names: tuple[str, ...]
    page_bytes: int
    dtype: str = "auto"
    window_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.block_tokens <= 0 or self.chunk_tokens <= 0:
            raise ValueError(f"group {self.index}: token sizes must be positive")
        if self.chunk_tokens % self.block_tokens:
            raise ValueError(
                f"group {self.index}: chunk_tokens={self.chunk_tokens} is not a "
                f"multiple of block_tokens={self.block_tokens}"
            )
        if (self.kind is GroupKind.SLIDING) != (self.window_tokens is not None):
            raise ValueError(
                f"group {self.index}: window_tokens is required for sliding-window "
                "groups and only for them"
            )
        if self.window_tokens is not None and self.window_tokens <= 0:
            raise ValueError(f"group {self.index}: window_tokens must be positive")

    @property
    def blocks_per_chunk(self) -> int:
        return self.chunk_tokens // self.block_tokens

    @property
    def window_chunks(self) -> int | None:
        """Chunks a hit needs right before the hit point (None: the whole prefix).

        Mirrors vLLM's ``get_sliding_window_size_in_chunks``: a window of W
        tokens spans ``cdiv(W - 1, chunk)`` chunks, at least ``cdiv(W, chunk)``;
        a state group needs one chunk.
        """
        if self.kind is GroupKind.FULL:
            return None
        if self.kind is GroupKind.STATE:
            return 1
        assert self.window_tokens is not None
        return max(-(-self.window_tokens // self.chunk_tokens),
                   -(-(self.window_tokens - 1) // self.chunk_tokens))

    @property
    def chunk_bytes(self) -> int:
        """Bytes one stored chunk takes (payload only) when every block is held."""
        blocks = 1 if self.kind is GroupKind.STATE else self.blocks_per_chunk
        return self.page_bytes * len(self.layer_names) * blocks


class ParallelSpec(msgspec.Struct, frozen=True, kw_only=True):
    """The parallel placement that shapes a worker's bytes."""

    tp_size: int = 1
    pp_size: int = 1
    pcp_size: int = 1
    dcp_size: int = 1
    rank: int = 0


class HybridLayout(msgspec.Struct, frozen=True, kw_only=True):
    """Ordered groups of one model instance plus what makes its bytes unique."""

    model: str
    dtype: str
    groups: tuple[GroupSpec, ...]
    parallel: ParallelSpec = ParallelSpec()
    tokens_per_hash: int = 0

    def __post_init__(self) -> None:
        ids = [g.index for g in self.groups]
        if not ids:
            raise ValueError("a layout needs at least one group")
        if ids != sorted(set(ids)):
            raise ValueError(f"group indices must be unique and ascending: {ids}")

    @property
    def fingerprint(self) -> str:
        """16 hex chars naming the byte layout; stable across processes."""
        blob = msgspec.json.encode(self)
        return xxhash.xxh3_64_hexdigest(blob)

    def group(self, index: int) -> GroupSpec:
        for g in self.groups:
            if g.index == index:
                return g
        raise KeyError(f"no group {index} in layout (groups: {[g.index for g in self.groups]})")

    def groups_of(self, kind: GroupKind) -> Sequence[GroupSpec]:
        return [g for g in self.groups if g.kind is kind]

    @property
    def recomputes_last_token(self) -> bool:
        """With any window or state group the last prompt token is recomputed."""
        return any(g.kind is not GroupKind.FULL for g in self.groups)
