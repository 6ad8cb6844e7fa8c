"""Synthetic workloads for the hit-rate simulator: four trace families at three scales.

``multi_turn_chat``, ``shared_system_prompts``, ``agentic_branching`` and
``long_document_qa`` build traces with ``trace_builder.Builder``;
``make_trace(name, scale=...)`` picks one by name at "quick" / "full" / "large".

Invariant (determinism): a generator called with the same arguments and seed
returns an equal trace; different seeds give different traces.

Imports no vLLM and no torch.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from hybridkv.sim.trace_builder import Builder, Range
from hybridkv.sim.trace_model import Trace

__all__ = [
    "GENERATORS",
    "SCALES",
    "agentic_branching",
    "long_document_qa",
    "make_trace",
    "multi_turn_chat",
    "shared_system_prompts",
]


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
    b = Builder(block_tokens, seed)
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
    b = Builder(block_tokens, seed)
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
    b = Builder(block_tokens, seed)
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
    b = Builder(block_tokens, seed)
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
