"""Workloads for the hit-rate simulator: synthetic trace generators and JSONL traces.

A trace is the list of prompts as the cache sees them. A prompt is a sequence of
block ids, one per ``block_tokens`` tokens; the last block may be partial.

Invariants:
- Prefix ids (Mooncake's trace format): a block id names a block's content
  *given its whole prefix*. Two requests share their first k blocks exactly when
  their first k ids are equal; an id never appears after two different prefixes,
  so equal ids at position i imply equal ids at every position before i. A
  partial last block has an id of its own, never the id of a full block, so a
  partial id is never followed by another block.
- Determinism: a generator called with the same arguments and seed returns an
  equal trace; different seeds give different traces.
- Timestamps never decrease over a trace.
- ``load_jsonl(save_jsonl(trace, path), block_tokens=trace.block_tokens)`` has
  the same requests as ``trace`` (timestamps are stored in whole milliseconds).

Imports no vLLM and no torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from itertools import chain
from pathlib import Path
from typing import Annotated

import msgspec
import numpy as np
import xxhash

__all__ = [
    "Request",
    "Trace",
    "multi_turn_chat",
    "shared_system_prompts",
    "agentic_branching",
    "long_document_qa",
    "GENERATORS",
    "SCALES",
    "make_trace",
    "save_jsonl",
    "load_jsonl",
    "token_hash_ids",
    "working_set_tokens",
    "prefix_stats",
]


class Request(msgspec.Struct, frozen=True, kw_only=True):
    """One prompt as the cache sees it."""

    hash_ids: tuple[int, ...]  # id of each block of the prompt: block i is tokens [i*B, (i+1)*B)
    input_length: int  # prompt tokens; len(hash_ids) == ceil(input_length / B)
    output_length: int = 0
    timestamp: float = 0.0  # seconds since trace start, non-decreasing over a trace
    session: str = ""  # conversation / user / agent id (informational)


class Trace(msgspec.Struct, kw_only=True):
    name: str
    block_tokens: int  # B: tokens per hash_id
    requests: list[Request]


# --------------------------------------------------------------------------- generators

Range = tuple[int, int]  # inclusive bounds of a length in tokens
Segment = tuple[int, int]  # (segment id, tokens): a run of text; equal ids mean equal text


class _Builder:
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


def multi_turn_chat(
    *,
    conversations: int = 32,
    turns: Range = (4, 10),
    system_prompts: int = 4,
    system_tokens: Range = (300, 700),
    user_tokens: Range = (100, 400),
    output_tokens: Range = (100, 300),
    arrival_rate: float = 0.2,
    think_time: float = 20.0,
    decode_rate: float = 50.0,
    block_tokens: int = 64,
    seed: int = 0,
) -> Trace:
    """Chats that grow turn by turn: each prompt is the previous one + its answer + a new message.

    Conversations start at Poisson times (``arrival_rate`` per second), each
    with one of ``system_prompts`` shared system prompts. Between turns the user
    waits for the answer (``output / decode_rate`` s) and thinks (exponential,
    mean ``think_time`` s), so many chats are active at once. Session: ``chat-<i>``.
    """
    b = _Builder(block_tokens, seed)
    systems = [b.text(system_tokens) for _ in range(system_prompts)]
    for c, start in enumerate(b.arrivals(conversations, arrival_rate)):
        prompt = [systems[b.rng.integers(system_prompts)]]
        t = start
        for _ in range(b.length(turns)):
            prompt.append(b.text(user_tokens))
            output = b.length(output_tokens)
            b.add(prompt, t, output, f"chat-{c}")
            prompt.append(b.fresh(output))  # the answer opens the next turn's prompt
            t += output / decode_rate + b.rng.exponential(think_time)
    return b.trace("multi_turn")


def shared_system_prompts(
    *,
    users: int = 200,
    system_prompts: int = 6,
    system_tokens: Range = (1000, 4000),
    user_tokens: Range = (50, 500),
    output_tokens: Range = (50, 300),
    zipf_exponent: float = 1.1,
    arrival_rate: float = 2.0,
    block_tokens: int = 64,
    seed: int = 0,
) -> Trace:
    """Independent single-turn requests behind a few long shared system prompts.

    System prompt k (1-based) is picked with probability proportional to
    ``k ** -zipf_exponent``; each request adds a user suffix of its own.
    Poisson arrivals at ``arrival_rate`` per second. Session: ``user-<i>``.
    """
    b = _Builder(block_tokens, seed)
    systems = [b.text(system_tokens) for _ in range(system_prompts)]
    weights = np.arange(1, system_prompts + 1, dtype=float) ** -zipf_exponent
    picks = b.rng.choice(system_prompts, size=users, p=weights / weights.sum())
    for u, (pick, t) in enumerate(zip(picks, b.arrivals(users, arrival_rate))):
        b.add([systems[pick], b.text(user_tokens)], t, b.length(output_tokens), f"user-{u}")
    return b.trace("shared_system")


def agentic_branching(
    *,
    trees: int = 16,
    depth: int = 3,
    fanout: int = 3,
    root_tokens: Range = (1000, 3000),
    step_tokens: Range = (100, 800),
    output_tokens: Range = (50, 300),
    arrival_rate: float = 0.1,
    tool_latency: float = 2.0,
    decode_rate: float = 50.0,
    block_tokens: int = 64,
    seed: int = 0,
) -> Trace:
    """Agent runs as trees of continuations, each run issuing its requests depth first.

    A run starts from a fresh root context (Poisson starts, ``arrival_rate`` per
    second). A node above ``depth`` has 1..``fanout`` children; a child's prompt
    is its parent's prompt followed by a fresh step (reasoning, tool call, tool
    output), so siblings share the parent's prompt and diverge right after it.
    Each request waits for the previous one's answer and a tool call
    (exponential, mean ``tool_latency`` s); runs overlap. Session: ``agent-<i>``.
    """
    b = _Builder(block_tokens, seed)
    for r, start in enumerate(b.arrivals(trees, arrival_rate)):
        t = start
        stack = [(0, [b.text(root_tokens)])]
        while stack:
            level, prompt = stack.pop()
            output = b.length(output_tokens)
            b.add(prompt, t, output, f"agent-{r}")
            t += output / decode_rate + b.rng.exponential(tool_latency)
            if level < depth:
                children = b.length((1, fanout))
                stack.extend((level + 1, prompt + [b.text(step_tokens)]) for _ in range(children))
    return b.trace("agentic")


def long_document_qa(
    *,
    documents: int = 6,
    questions: Range = (20, 30),
    document_tokens: Range = (4000, 16000),
    question_tokens: Range = (20, 150),
    output_tokens: Range = (50, 300),
    arrival_rate: float = 0.05,
    question_interval: float = 15.0,
    block_tokens: int = 64,
    seed: int = 0,
) -> Trace:
    """A few long documents, each asked several questions (document + short question).

    Documents arrive at Poisson times (``arrival_rate`` per second); a document's
    questions follow one another at exponential intervals (mean
    ``question_interval`` s), so questions on different documents interleave.
    Session: ``doc-<i>``.
    """
    b = _Builder(block_tokens, seed)
    for d, start in enumerate(b.arrivals(documents, arrival_rate)):
        document = b.text(document_tokens)
        t = start
        for _ in range(b.length(questions)):
            b.add([document, b.text(question_tokens)], t, b.length(output_tokens), f"doc-{d}")
            t += b.rng.exponential(question_interval)
    return b.trace("document_qa")


GENERATORS: dict[str, Callable[..., Trace]] = {
    "multi_turn": multi_turn_chat,
    "shared_system": shared_system_prompts,
    "agentic": agentic_branching,
    "document_qa": long_document_qa,
}

# Shorter than long_document_qa's default 4k-16k documents, to keep "quick" under 1M tokens.
_SHORT_DOCUMENTS = {"document_tokens": (3000, 6000)}
#: "large": about 12K requests each, production-like lengths; multi_turn is shaped like
#: Mooncake's conversation trace (~145M prompt tokens, ~12K tokens per prompt)
_LARGE_CHAT = {"conversations": 800, "turns": (4, 26), "system_prompts": 16,
               "system_tokens": (1000, 4000), "user_tokens": (150, 1200),
               "output_tokens": (100, 600), "arrival_rate": 0.5}
#: Generator arguments per trace and scale: "quick" is 150-300 requests, "full" about 4x,
#: "large" about 12K requests.
_SCALES: dict[str, dict[str, dict]] = {
    "multi_turn": {"quick": {"conversations": 32}, "full": {"conversations": 128},
                   "large": _LARGE_CHAT},
    "shared_system": {"quick": {"users": 200}, "full": {"users": 800},
                      "large": {"users": 12000, "system_prompts": 24}},
    "agentic": {"quick": {"trees": 16}, "full": {"trees": 64}, "large": {"trees": 800}},
    "document_qa": {
        "quick": {"documents": 8, **_SHORT_DOCUMENTS},
        "full": {"documents": 32, **_SHORT_DOCUMENTS},
        "large": {"documents": 480},
    },
}
SCALES = ("quick", "full", "large")


def make_trace(name: str, *, scale: str = "quick", seed: int = 0, block_tokens: int = 64) -> Trace:
    """A named synthetic trace.

    ``scale`` "quick" gives 150-300 requests and well under 1.5M prompt tokens;
    "full" about 4 times as many; "large" about 12K requests (multi_turn: about
    145M prompt tokens; generated in seconds).
    """
    if name not in GENERATORS:
        raise ValueError(f"unknown trace {name!r}; valid names: {', '.join(GENERATORS)}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid scales: {', '.join(SCALES)}")
    return GENERATORS[name](**_SCALES[name][scale], block_tokens=block_tokens, seed=seed)


# --------------------------------------------------------------------------- JSONL

_NonNegative = Annotated[int, msgspec.Meta(ge=0)]
_TokenId = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class _Line(msgspec.Struct):
    """A JSONL line as read: Mooncake form (``hash_ids``) or token form (``tokens``)."""

    timestamp: Annotated[float, msgspec.Meta(ge=0)] | None = None  # milliseconds
    input_length: _NonNegative | None = None
    output_length: _NonNegative = 0
    hash_ids: list[int] | None = None
    tokens: list[_TokenId] | None = None
    session: str = ""


class _MooncakeLine(msgspec.Struct):
    """A JSONL line as written (Mooncake's trace format plus ``session``)."""

    timestamp: int  # milliseconds
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]
    session: str


def save_jsonl(trace: Trace, path: str | os.PathLike) -> Path:
    """Write one Mooncake-style JSON object per request; returns the path."""
    encoder = msgspec.json.Encoder()
    path = Path(path)
    with open(path, "wb") as f:
        for r in trace.requests:
            line = _MooncakeLine(
                timestamp=round(r.timestamp * 1000),
                input_length=r.input_length,
                output_length=r.output_length,
                hash_ids=r.hash_ids,
                session=r.session,
            )
            f.write(encoder.encode(line) + b"\n")
    return path


def load_jsonl(path: str | os.PathLike, *, block_tokens: int = 512,
               name: str | None = None) -> Trace:
    """Read a JSONL trace, one request per line, in file order; blank lines are skipped.

    A line is either ``{"timestamp": ms, "input_length": n, "output_length": m,
    "hash_ids": [...], "session": s}`` (Mooncake's format; ``output_length`` and
    ``session`` optional) or ``{"tokens": [...], "timestamp": ms,
    "output_length": m}``, whose ids come from ``token_hash_ids``. A missing
    timestamp repeats the previous line's (0 on the first line). Raises
    ValueError naming the line for a malformed line, ids inconsistent with
    ``input_length`` and ``block_tokens``, or a timestamp that goes backwards.
    """
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
    decoder = msgspec.json.Decoder(_Line)
    requests: list[Request] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            previous = requests[-1].timestamp if requests else 0.0
            try:
                requests.append(_to_request(decoder.decode(raw), block_tokens, previous))
            except (msgspec.DecodeError, ValueError) as exc:
                raise ValueError(f"{os.fspath(path)}, line {lineno}: {exc}") from None
    return Trace(name=Path(path).stem if name is None else name, block_tokens=block_tokens,
                 requests=requests)


def _to_request(line: _Line, block_tokens: int, previous_timestamp: float) -> Request:
    if line.tokens is not None and line.hash_ids is not None:
        raise ValueError("has both 'tokens' and 'hash_ids'")
    if line.tokens is not None:
        if line.input_length not in (None, len(line.tokens)):
            raise ValueError(f"input_length {line.input_length} != {len(line.tokens)} tokens")
        hash_ids = token_hash_ids(line.tokens, block_tokens)
        input_length = len(line.tokens)
    elif line.hash_ids is None:
        raise ValueError("missing field 'hash_ids' (or 'tokens')")
    elif line.input_length is None:
        raise ValueError("missing field 'input_length'")
    else:
        hash_ids, input_length = tuple(line.hash_ids), line.input_length
        expected = -(-input_length // block_tokens)
        if len(hash_ids) != expected:
            raise ValueError(f"{len(hash_ids)} hash_ids, expected {expected} for input_length "
                             f"{input_length} at {block_tokens} tokens per block")
    timestamp = previous_timestamp if line.timestamp is None else line.timestamp / 1000
    if timestamp < previous_timestamp:
        raise ValueError(f"timestamp {line.timestamp:g} ms is before the previous line's "
                         f"{previous_timestamp * 1000:g} ms")
    return Request(hash_ids=hash_ids, input_length=input_length, output_length=line.output_length,
                   timestamp=timestamp, session=line.session)


def token_hash_ids(tokens: Sequence[int], block_tokens: int) -> tuple[int, ...]:
    """Chained block ids of token ids.

    Block id = xxh3_64 of the previous block's id (8 bytes little-endian; none
    for the first block) followed by the block's tokens as int64 little-endian.
    Equal token prefixes give equal ids; a partial last block hashes fewer
    tokens, so its id differs from the full block's.
    """
    data = np.asarray(tokens, dtype="<i8")
    ids: list[int] = []
    previous = b""
    for start in range(0, len(data), block_tokens):
        block_id = xxhash.xxh3_64_intdigest(previous + data[start:start + block_tokens].tobytes())
        ids.append(block_id)
        previous = block_id.to_bytes(8, "little")
    return tuple(ids)


# --------------------------------------------------------------------------- stats

def working_set_tokens(trace: Trace) -> int:
    """Distinct blocks times ``block_tokens``: what a cache holding everything would store."""
    return len(set(chain.from_iterable(r.hash_ids for r in trace.requests))) * trace.block_tokens


def prefix_stats(trace: Trace) -> dict[str, float]:
    """Size of a trace and an upper bound on block reuse.

    ``reused_fraction`` is the share of prompt blocks whose id appeared earlier
    in the trace: the block hit rate of an unbounded cache.
    """
    blocks = sum(len(r.hash_ids) for r in trace.requests)
    distinct = len(set(chain.from_iterable(r.hash_ids for r in trace.requests)))
    return {
        "requests": len(trace.requests),
        "prompt_tokens": sum(r.input_length for r in trace.requests),
        "prompt_blocks": blocks,
        "distinct_blocks": distinct,
        "reused_fraction": 1 - distinct / blocks if blocks else 0.0,
    }
