"""Cost of an eviction decision, and how often one runs, for the group-aware policy.

The group-aware policy decides what to evict by analysing every stored chunk
(which hit points exist, which chunks they need): one decision costs time
linear in the chunks on disk, and in vLLM it runs on the scheduler's thread
inside ``prepare_store``. This benchmark measures

1. the time of one ``victims`` call against the number of chunks stored, per
   model layout (a synthetic index filled by the policy's own admission: chats
   on shared system prompts), and the same for group-agnostic LRU beside it;
2. how many eviction decisions a replay of the multi-turn trace at 25% of its
   working set makes with ``eviction_headroom`` 0 and with the default, and
   the token hit rate of both (same run, so the ratio is meaningful).

    python benchmarks/policy_overhead.py --out FILE.json [--quick]

--quick: 1k and 4k chunks and the quick trace (about 20 s); otherwise up to
16k chunks and the full-scale trace (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

from hybridkv.capacity import DEFAULT_HEADROOM, Capacity
from hybridkv.index import ChunkIndex
from hybridkv.keys import make_key
from hybridkv.policies import Candidate, RequestView, make_policy
from hybridkv.sim.layouts import SIM_MODELS, SimModel
from hybridkv.sim.replay import replay, working_set_bytes
from hybridkv.sim.traces import make_trace


def fill_index(model: SimModel, chunks: int, seed: int = 0) -> ChunkIndex:
    """An index of about ``chunks`` chunks, admitted by the group-aware policy (unbounded)."""
    rng = random.Random(seed)
    index = ChunkIndex()
    layout = model.layout
    cap = Capacity(index, make_policy("group_aware", layout, cost=model.cost), None)
    systems = [[rng.getrandbits(64) for _ in range(rng.randint(2, 6))] for _ in range(8)]
    n = 0
    while len(index) < chunks:
        ids = rng.choice(systems) + [rng.getrandbits(64) for _ in range(rng.randint(2, 24))]
        hashes = [hash(tuple(ids[:i + 1])).to_bytes(8, "big", signed=True)
                  for i in range(len(ids))]
        batch, positions = [], {}
        for g in layout.groups:
            keys = [make_key(h, g.index) for h in hashes]
            for i, k in enumerate(keys):
                positions[k] = (i + 1) * g.chunk_tokens
                if k not in index:
                    batch.append(Candidate(k, g.index, (i + 1) * g.chunk_tokens, g.chunk_bytes,
                                           keys[i - 1] if i else None))
        rid = f"r{n}"
        n += 1
        view = RequestView(rid, positions, len(ids) * layout.groups[0].chunk_tokens + 7)
        for cand in cap.plan_store(batch, view).admitted:
            cap.commit(cand.key, size=cand.size, position=cand.position, parent=cand.parent)
        cap.request_finished(rid)
    return index


def time_victims(model: SimModel, index: ChunkIndex, policy: str, repeat: int) -> float:
    """Median seconds of one victims call asking for 1% of the stored bytes."""
    pol = make_policy(policy, model.layout, cost=model.cost)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        pol.victims(index, max(1, index.bytes_used // 100))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    sizes = (1000, 4000) if args.quick else (1000, 4000, 16000)
    started = time.perf_counter()

    scaling = []
    for name, model in SIM_MODELS.items():
        for size in sizes:
            index = fill_index(model, size)
            row = {"model": name, "chunks": len(index)}
            for policy in ("group_aware", "lru"):
                s = time_victims(model, index, policy, repeat=3)
                row[f"{policy}_ms"] = s * 1e3
                row[f"{policy}_us_per_chunk"] = s * 1e6 / len(index)
            scaling.append(row)
            print(f"{name:15s} {row['chunks']:>6} chunks: group_aware {row['group_aware_ms']:8.1f} "
                  f"ms ({row['group_aware_us_per_chunk']:.1f} us/chunk), lru "
                  f"{row['lru_ms']:6.1f} ms")

    trace = make_trace("multi_turn", scale="quick" if args.quick else "full")
    headroom = []
    for name in ("gemma3_27b", "jamba_mini"):
        model = SIM_MODELS[name]
        budget = int(working_set_bytes(trace, model) * 0.25)
        runs = {h: replay(trace, model, "group_aware", budget, budget_fraction=0.25, headroom=h)
                for h in (0.0, DEFAULT_HEADROOM)}
        none, dflt = runs[0.0], runs[DEFAULT_HEADROOM]
        row = {"model": name, "trace": trace.name, "requests": len(trace.requests),
               "budget_fraction": 0.25, "default_headroom": DEFAULT_HEADROOM,
               "victim_calls_no_headroom": none.victim_calls,
               "victim_calls_default": dflt.victim_calls,
               "calls_ratio": none.victim_calls / max(1, dflt.victim_calls),
               "hit_rate_no_headroom": none.token_hit_rate,
               "hit_rate_default": dflt.token_hit_rate,
               "wall_s_no_headroom": none.wall_s, "wall_s_default": dflt.wall_s}
        headroom.append(row)
        print(f"{name:15s} multi_turn @25%, {row['requests']} requests: eviction decisions "
              f"{row['victim_calls_no_headroom']} -> {row['victim_calls_default']} "
              f"({row['calls_ratio']:.1f}x fewer) with headroom {DEFAULT_HEADROOM}; hit rate "
              f"{row['hit_rate_no_headroom']:.3f} -> {row['hit_rate_default']:.3f}")

    doc = {"benchmark": "policy_overhead", "quick": args.quick, "command": sys.argv,
           "machine": {"platform": platform.platform(), "python": platform.python_version()},
           "victims_scaling": scaling, "headroom": headroom,
           "wall_s": time.perf_counter() - started}
    args.out.write_text(json.dumps(doc, indent=1))
    print(f"saved {args.out} ({doc['wall_s']:.1f} s)")
    return doc


if __name__ == "__main__":
    main()
