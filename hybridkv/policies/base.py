"""The vocabulary of capacity policies: candidates, admission verdicts, the policy interface.

A capacity policy decides which offered chunks are worth disk space
(``admit``) and which stored chunks give way when the budget is full
(``victims``). The same policy objects run inside the vLLM manager and inside
the simulator (``hybridkv.sim``), driven by ``hybridkv.capacity.Capacity``.

Invariants every policy keeps:
- ``victims`` never names a pinned chunk (being loaded) nor one in ``protect``
  (the offering request's own chunks);
- ``victims`` names each key at most once and only stored keys;
- policies hold no state that ``ChunkIndex`` cannot rebuild after a restart
  (recency, parents and the ``spare`` flag live in the index).
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from hybridkv.index import ChunkIndex

__all__ = ["Admission", "Candidate", "RequestView", "CapacityPolicy"]


class Admission(enum.IntEnum):
    """What to do with an offered chunk."""

    #: never part of a servable hit: not stored
    REJECT = 0
    #: useful only by chance: stored into free space or in place of chunks worth less
    #: (dead ones, spare ones far from their request's end; a policy without that
    #: notion: none); never evicts a checkpoint
    SPARE = 1
    #: stored, evicting chunks of lower utility if the budget is full
    ADMIT = 2


@dataclass(frozen=True, slots=True)
class Candidate:
    """A chunk the engine offers to store."""

    key: bytes
    group: int
    position: int  # end token of the chunk within its prefix
    size: int  # bytes it will take on disk
    parent: bytes | None  # the chunk of the same group it extends


@dataclass(frozen=True, slots=True)
class RequestView:
    """What a policy knows about the request whose chunks are offered."""

    request_id: str
    #: every chunk key of the request known so far -> its end position
    positions: Mapping[bytes, int]
    #: prompt length, when the caller knows it
    num_tokens: int | None = None


class CapacityPolicy(ABC):
    """Admission and eviction over a ``ChunkIndex``; see the module invariants."""

    name: str = "abstract"
    #: groups every hit depends on from the start (full attention), for a
    #: prefix-aware policy; a generic one leaves this empty
    spine_groups: frozenset[int] = frozenset()

    def admit(self, batch: Sequence[Candidate], request: RequestView,
              index: ChunkIndex) -> list[Admission]:
        """One verdict per candidate (default: admit everything)."""
        return [Admission.ADMIT] * len(batch)

    @abstractmethod
    def victims(self, index: ChunkIndex, needed: int, protect: Collection[bytes] = (), *,
                expendable: int = 0) -> list[bytes]:
        """Stored keys to delete, in order, freeing at least ``needed`` bytes if possible.

        ``expendable``: up to that many more bytes for ``SPARE`` candidates, taken only
        from chunks worth less than any spare one (a policy without that notion, none).
        """

    def attach(self, index: ChunkIndex) -> None:
        """The index this policy will decide over (``Capacity`` calls it once).

        A policy that keeps incremental state builds it from the index and subscribes
        to its changes here or, if building is costly, at its first decision.
        """

    def orphans_of(self, index: ChunkIndex, key: bytes) -> list[bytes]:
        """Stored chunks that can no longer be part of any hit once ``key`` is gone.

        ``Capacity.remove`` removes them along with ``key``; default none.
        """
        return []

    def on_load(self, keys: Sequence[bytes], index: ChunkIndex) -> None:
        """Chunks are being loaded for one hit (in group, then prefix order)."""
        for key in keys:
            index.touch(key)

    def cleanup(self, index: ChunkIndex, budget: int,
                protect: Collection[bytes] = ()) -> list[bytes]:
        """Keys to delete after stores complete (a background cleaner); default none.

        Like ``victims``, never names a pinned key nor one in ``protect``.
        """
        return []

