"""The router: a prefix index, a request hasher, tier layouts and load counting, in one place.

``Router.route`` answers one request: per replica per tier servable tokens and
the pick (``scorer.pick``). Load is the number of requests the router sent to
each replica in the last ``load_window_s`` seconds (a caller that knows real
loads passes ``loads``). Thread-safe: the index has its own lock, loads one more.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence

import msgspec

from hybridkv.groups import HybridLayout
from hybridkv.routing.events import hash_key
from hybridkv.routing.hashing import RequestHasher
from hybridkv.routing.index import DEFAULT_MAX_ENTRIES, PrefixIndex
from hybridkv.routing.scorer import ReplicaScore, pick, score_replicas, tier_groups

__all__ = ["Router", "RouteAnswer"]


class RouteAnswer(msgspec.Struct, kw_only=True):
    pick: str | None
    predicted_tokens: int
    num_tokens: int
    replicas: list[ReplicaScore]


class Router:
    def __init__(self, layout: HybridLayout, replicas: Sequence[str], *,
                 hasher: RequestHasher | None = None, max_entries: int = DEFAULT_MAX_ENTRIES,
                 load_window_s: float = 10.0) -> None:
        if not replicas:
            raise ValueError("a router needs at least one replica")
        self.layout = layout
        self.groups = tier_groups(layout)
        block = min(g.block_tokens for g in layout.groups)
        self.hasher = hasher or RequestHasher(block_tokens=block)
        self.index = PrefixIndex(layout.groups, max_entries=max_entries)
        for name in replicas:
            self.index.add_replica(name)
        self.load_window_s = load_window_s
        self._sent: dict[str, deque[float]] = {name: deque() for name in replicas}
        self._load_lock = threading.Lock()

    def loads(self) -> dict[str, float]:
        now = time.monotonic()
        with self._load_lock:
            for q in self._sent.values():
                while q and now - q[0] > self.load_window_s:
                    q.popleft()
            return {name: float(len(q)) for name, q in self._sent.items()}

    def route(self, token_ids: Sequence[int] | None = None, *,
              block_hashes: Sequence[bytes | int] | None = None, num_tokens: int | None = None,
              loads: Mapping[str, float] | None = None, record: bool = True) -> RouteAnswer:
        """Score every replica for one request given as token ids or as block hashes.

        Block hashes are the engine's, one per ``hasher.block_tokens`` tokens
        (bytes or ints); ``num_tokens`` defaults to their count times that size.
        ``record``: count the pick in the router's own load.
        """
        hb = self.hasher.block_tokens
        if (token_ids is None) == (block_hashes is None):
            raise ValueError("give exactly one of token_ids and block_hashes")
        if token_ids is not None:
            keys = self.hasher.keys(token_ids)
            n = len(token_ids)
        else:
            keys = [hash_key(h) for h in block_hashes]
            n = len(keys) * hb if num_tokens is None else num_tokens
            if n < len(keys) * hb:
                raise ValueError(f"num_tokens={n} is shorter than {len(keys)} hash blocks "
                                 f"of {hb} tokens")
        scores = score_replicas(self.index, self.groups, keys, hb, n,
                                loads if loads is not None else self.loads())
        best = pick(scores)
        if record and best is not None:
            with self._load_lock:
                self._sent[best.replica].append(time.monotonic())
        return RouteAnswer(pick=best.replica if best else None,
                           predicted_tokens=best.total if best else 0,
                           num_tokens=n, replicas=scores)
