"""How the trace generators build prompts: random lengths, fresh text, interned prefix ids.

Invariants:
- A builder draws every random number from one ``numpy`` generator seeded once,
  so a generator that calls it in a fixed order is deterministic in its seed.
- ``hash_ids`` gives one id per distinct (parent id, block content): the prefix
  ids of ``hybridkv.sim.trace_model``; equal segment ids mean equal text.
- ``trace()`` orders requests by whole-millisecond timestamp, then creation order.

Imports no vLLM and no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hybridkv.sim.trace_model import Request, Trace

__all__ = ["Builder", "Range", "Segment"]


Range = tuple[int, int]  # inclusive bounds of a length in tokens
Segment = tuple[int, int]  # (segment id, tokens): a run of text; equal ids mean equal text


class Builder:
    """Shared by the generators: random lengths, fresh text, interned block ids, timed requests."""

    def __init__(self, block_tokens: int, seed: int) -> None:
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        self.block_tokens = block_tokens
        self.rng = np.random.default_rng(seed)
        self._block_ids: dict[tuple, int] = {}
        self._segments = 0
        #: prompt (segments) -> (ids of its full blocks, last full id, partial block, fill)
        self._hashed: dict[tuple[Segment, ...], tuple] = {}
        self._requests: list[tuple[int, int, Request]] = []  # (ms, creation order, request)

    def length(self, bounds: Range) -> int:
        return int(self.rng.integers(bounds[0], bounds[1] + 1))

    def fresh(self, tokens: int) -> Segment:
        """Text of ``tokens`` tokens that no other segment shares."""
        self._segments += 1
        return (self._segments, tokens)

    def text(self, bounds: Range) -> Segment:
        return self.fresh(self.length(bounds))

    def arrivals(self, n: int, rate: float) -> np.ndarray:
        """``n`` Poisson arrival times (seconds) at ``rate`` per second."""
        return np.cumsum(self.rng.exponential(1.0 / rate, n))

    def hash_ids(self, prompt: Sequence[Segment]) -> tuple[int, ...]:
        """Block ids of a prompt: one id per distinct (parent id, block content).

        A prompt that extends one hashed before by up to three segments (a chat's next
        turn, an agent's next step) resumes from that prompt's state, so a long
        conversation costs time linear, not quadratic, in its length.
        """
        ids: list[int] = []
        parent = -1
        content: list[tuple[int, int, int]] = []  # (segment, start, end) slices of the block
        fill = 0
        first = 0
        for j in range(len(prompt) - 1, max(0, len(prompt) - 4), -1):
            state = self._hashed.get(tuple(prompt[:j]))
            if state is not None:
                done, parent, partial, fill = state
                ids, content, first = list(done), list(partial), j
                break
        for segment, tokens in prompt[first:]:
            start = 0
            while start < tokens:
                take = min(tokens - start, self.block_tokens - fill)
                content.append((segment, start, start + take))
                start += take
                fill += take
                if fill == self.block_tokens:
                    parent = self._intern(parent, content)
                    ids.append(parent)
                    content, fill = [], 0
        self._hashed[tuple(prompt)] = (tuple(ids), parent, tuple(content), fill)
        if content:
            ids.append(self._intern(parent, content))
        return tuple(ids)

    def _intern(self, parent: int, content: list[tuple[int, int, int]]) -> int:
        return self._block_ids.setdefault((parent, tuple(content)), len(self._block_ids))

    def add(self, prompt: Sequence[Segment], time_s: float, output_length: int,
            session: str) -> None:
        ms = round(float(time_s) * 1000)
        request = Request(
            hash_ids=self.hash_ids(prompt),
            input_length=sum(tokens for _, tokens in prompt),
            output_length=output_length,
            timestamp=ms / 1000,
            session=session,
        )
        self._requests.append((ms, len(self._requests), request))

    def trace(self, name: str) -> Trace:
        """The requests in time order (creation order among equal milliseconds)."""
        ordered = [request for _, _, request in sorted(self._requests)]
        return Trace(name=name, block_tokens=self.block_tokens, requests=ordered)
