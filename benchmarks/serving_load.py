"""Load for ``serving.py``: seeded workloads, an open-loop streaming HTTP client, the figures.

- ``shared_prefix``: G prefix groups x P users (the llm-d / inference-perf shape): every
  request is its group's system prompt plus a question of its own; the answer length is fixed.
- ``multi_turn``: U users x R rounds; round r's prompt is the whole history (rounds 0..r-1's
  prompts and answers, as seeded tokens, so it is the same on every server) plus a new turn.
  A user's round r is sent no earlier than its arrival time nor before round r-1 completes.

Arrivals are Poisson at the offered rate (seeded): open loop, a request's send time never
waits on another request except the previous round of the same user.
``run_load`` streams ``/v1/completions`` (token-id prompts, greedy, ``ignore_eos``); TTFT is
the time to the first streamed chunk carrying a token. Invariant: every request is counted
once, completed or failed (with its reason), never dropped.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

#: token ids prompts draw from (the tiny models' byte range; no special tokens)
TOKENS = range(4, 260)


@dataclass
class Req:
    prompt: list[int]
    max_tokens: int
    user: str  # requests of one user run in order (multi-turn)
    round: int = 0


@dataclass
class Shape:
    """Sizes of a workload (tokens and counts)."""
    groups: int = 4
    users: int = 4
    system: int = 1024
    question: int = 128
    answer: int = 32
    rounds: int = 3


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.choice(TOKENS) for _ in range(n)]


def shared_prefix(shape: Shape, seed: int) -> list[Req]:
    rng = random.Random(f"shared_prefix {seed}")
    systems = [_ids(rng, shape.system) for _ in range(shape.groups)]
    reqs = [Req(systems[g] + _ids(rng, shape.question), shape.answer, f"g{g}u{u}")
            for g in range(shape.groups) for u in range(shape.users)]
    rng.shuffle(reqs)
    return reqs


def multi_turn(shape: Shape, seed: int) -> list[Req]:
    """Users' rounds interleaved: round 0 of every user, then round 1, ..."""
    rng = random.Random(f"multi_turn {seed}")
    history = {u: _ids(rng, shape.system) for u in range(shape.users)}
    reqs = []
    for r in range(shape.rounds):
        for u in range(shape.users):
            history[u] = history[u] + _ids(rng, shape.question)
            reqs.append(Req(list(history[u]), shape.answer, f"u{u}", r))
            history[u] = history[u] + _ids(rng, shape.answer)  # the answer, as history
    return reqs


WORKLOADS: dict[str, Callable[[Shape, int], list[Req]]] = {
    "shared_prefix": shared_prefix, "multi_turn": multi_turn}


def arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Send times (s from the start) of ``n`` requests, Poisson at ``rate`` per second."""
    rng = random.Random(f"arrivals {seed} {rate}")
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


@dataclass
class Result:
    ok: bool
    sent: float
    ttft: float | None = None
    e2e: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    tokens: list[int] = field(default_factory=list)
    error: str = ""
    replica: str = ""
    sent_at: float = 0.0  # time.monotonic() when sent (to match against outside events)


#: ``pick(req) -> (replica name, base URL)``: where a request goes (one server, round robin,
#: or a router's answer)
Pick = Callable[[Req], "asyncio.Future | tuple[str, str]"]


async def _one(session, pick, model: str, req: Req, sent: float, t0: float,
               timeout: float) -> Result:
    import aiohttp

    res = Result(ok=False, sent=sent, prompt_tokens=len(req.prompt), sent_at=time.monotonic())
    try:
        chosen = pick(req)
        name, url = (await chosen) if asyncio.isfuture(chosen) or asyncio.iscoroutine(chosen) \
            else chosen
        res.replica = name
        body = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True, "logprobs": 0,
                "return_tokens_as_token_ids": True,
                "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        async with session.post(url + "/v1/completions", json=body,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return res
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                for choice in chunk.get("choices") or ():
                    toks = (choice.get("logprobs") or {}).get("tokens") or []
                    if toks and res.ttft is None:
                        res.ttft = time.perf_counter() - start
                    res.tokens += [int(t.split(":", 1)[1]) for t in toks]
                usage = chunk.get("usage")
                if usage:
                    res.output_tokens = usage.get("completion_tokens", 0)
                    res.prompt_tokens = usage.get("prompt_tokens", res.prompt_tokens)
                    res.cached_tokens = (usage.get("prompt_tokens_details") or {}).get(
                        "cached_tokens") or 0
        res.e2e = time.perf_counter() - start
        res.ok = res.ttft is not None and len(res.tokens) == req.max_tokens
        if not res.ok:
            res.error = f"{len(res.tokens)} of {req.max_tokens} tokens streamed"
    except Exception as exc:  # noqa: BLE001  every failure is a counted, named result
        res.error = f"{type(exc).__name__}: {exc}"[:200]
    return res


async def _run(reqs: Sequence[Req], rate: float, pick, model: str, seed: int,
               timeout: float) -> tuple[list[Result], float]:
    import aiohttp

    times = arrivals(len(reqs), rate, seed)
    done_of: dict[str, asyncio.Event] = {}
    t0 = time.perf_counter()

    async def send(i: int, req: Req, prev: asyncio.Event | None, mine: asyncio.Event):
        await asyncio.sleep(max(0.0, times[i] - (time.perf_counter() - t0)))
        if prev is not None:
            await prev.wait()
        try:
            return await _one(session, pick, model, req, time.perf_counter() - t0, t0, timeout)
        finally:
            mine.set()

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = []
        for i, req in enumerate(reqs):
            mine = asyncio.Event()
            tasks.append(send(i, req, done_of.get(req.user), mine))
            done_of[req.user] = mine
        results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - t0


def run_load(reqs: Sequence[Req], rate: float, pick, model: str, *, seed: int = 0,
             timeout: float = 600) -> tuple[list[Result], float]:
    """Send ``reqs`` at ``rate``; every request's result and the run's wall time."""
    return asyncio.run(_run(reqs, rate, pick, model, seed, timeout))


def round_robin(urls: dict[str, str]) -> Pick:
    cycle = itertools.cycle(urls.items())
    return lambda req: next(cycle)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def summarize(results: list[Result], wall: float, rate: float) -> dict:
    """Figures of one run at one offered rate (seconds, tokens per second)."""
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok]
    e2e = [r.e2e for r in ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    last_done = max((r.sent + r.e2e for r in ok), default=wall)
    last_sent = max((r.sent for r in results), default=0.0)
    offered = (len(results) - 1) / last_sent if len(results) > 1 and last_sent > 0 else rate
    return {
        "rate": rate, "requests": len(results), "completed": len(ok),
        "failed": len(results) - len(ok),
        "failures": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": round(last_done, 3),
        "request_throughput": len(ok) / last_done if last_done else 0.0,
        "output_tokens_per_s": out_tokens / last_done if last_done else 0.0,
        "total_tokens_per_s": (in_tokens + out_tokens) / last_done if last_done else 0.0,
        "ttft_mean_s": statistics.fmean(ttft) if ttft else None,
        "ttft_p50_s": _pct(ttft, 0.5), "ttft_p90_s": _pct(ttft, 0.9),
        "ttft_p99_s": _pct(ttft, 0.99),
        "e2e_mean_s": statistics.fmean(e2e) if e2e else None, "e2e_p90_s": _pct(e2e, 0.9),
        "prompt_tokens": in_tokens, "output_tokens": out_tokens,
        "cached_tokens": sum(r.cached_tokens for r in ok),
        # the queue did not grow: completions kept up with the arrivals actually sent (the
        # seeded Poisson schedule's own rate) to within 20 %
        "offered_rate": round(offered, 3),
        "sustained": len(ok) == len(results) and bool(ok) and
                     len(ok) / last_done >= 0.8 * offered,
    }
