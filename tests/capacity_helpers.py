"""Shared helpers of the capacity tests (``test_capacity_*.py``).

Layouts of one group per kind (``make_layout``), prompts as tuples of chunk ids
whose keys are prefix digests (``request_keys``), the hit a prompt gets and the
keys it loads (``hit_keys``), and ``Sim``: requests through ``Capacity`` the way
the manager drives it, without files. One chunk is one block (``C`` tokens).
"""

from __future__ import annotations

import xxhash
from vllm.v1.kv_offload.base import ReqContext

from hybridkv.capacity import Capacity
from hybridkv.config import HybridKVConfig
from hybridkv.groups import GroupKind, GroupSpec, HybridLayout
from hybridkv.hit_rule import load_window_chunks, servable_tokens
from hybridkv.index import ChunkIndex
from hybridkv.keys import make_key
from hybridkv.policies import Candidate, RequestView, make_policy
from hybridkv.store.chunk_store import ChunkStore
from hybridkv.vllm.manager import HybridKVManager

C = 16  # tokens per block = tokens per chunk
FULL, SLIDING, STATE = GroupKind.FULL, GroupKind.SLIDING, GroupKind.STATE


# ---------------------------------------------------------------------- layouts
def make_layout(kinds: tuple[GroupKind, ...], *, window: int = 40,
                pages: dict[GroupKind, int] | None = None,
                layers: dict[GroupKind, int] | None = None) -> HybridLayout:
    """One group per kind, in order; window 40 tokens = 3 chunks, 32 = 2 chunks."""
    pages = pages or {FULL: 1024, SLIDING: 1024, STATE: 3072}
    layers = layers or {FULL: 2, SLIDING: 1, STATE: 1}
    groups = []
    for i, kind in enumerate(kinds):
        groups.append(GroupSpec(
            index=i, kind=kind, block_tokens=C, chunk_tokens=C,
            layer_names=tuple(f"{kind.value}.{i}.{j}" for j in range(layers[kind])),
            page_bytes=pages[kind], dtype="bfloat16",
            window_tokens=window if kind is SLIDING else None))
    return HybridLayout(model=f"props-{'-'.join(k.value for k in kinds)}-{window}",
                        dtype="bfloat16", groups=tuple(groups))


# ---------------------------------------------------------------------- requests
def chunk_hash(prefix: tuple[int, ...]) -> bytes:
    """The prefix hash at a chunk boundary: a digest of every chunk id up to it."""
    return xxhash.xxh3_128_digest(repr(tuple(prefix)).encode())


def align_of(layout: HybridLayout) -> int | None:
    """vLLM's Mamba ``align`` cache mode (the one prefix caching and offloading use):
    with a state group the hit is rounded down to a chunk (``resolve_mamba_align_size``)."""
    return C if layout.groups_of(STATE) else None


def request_keys(layout: HybridLayout, ids: tuple[int, ...]) -> dict[int, list[bytes]]:
    """group index -> the keys of the request's complete chunks, in prefix order."""
    return {g.index: [make_key(chunk_hash(ids[:i + 1]), g.index) for i in range(len(ids))]
            for g in layout.groups}


def hit_keys(layout: HybridLayout, keys: dict[int, list[bytes]], hit: int) -> list[bytes]:
    """What a hit of ``hit`` tokens loads: group by group, each in prefix order."""
    out: list[bytes] = []
    if hit <= 0:
        return out
    for g in layout.groups:
        end = -(-hit // g.chunk_tokens)
        if g.kind is FULL:
            out += keys[g.index][:end]
        else:
            out += keys[g.index][max(0, end - load_window_chunks(g, hit)):end]
    return out


# ---------------------------------------------------------------------- examples
# Capacity-level cases with exact sizes (the simulator's view, driven like the
# manager drives it): every chunk of every group takes 100 bytes. Names in the
# assertions: F / W / S (full, window, state) + the chunk ids of the prefix.

TINY = {FULL: 100, SLIDING: 100, STATE: 100}
ONE = {FULL: 1, SLIDING: 1, STATE: 1}


class Sim:
    """Requests through ``Capacity`` as the manager drives it, without files."""

    def __init__(self, layout: HybridLayout, policy: str, budget: int | None,
                 headroom: float = 0.0):
        self.layout = layout
        self.index = ChunkIndex()
        # exact sizes: no headroom unless a test asks for it
        self.cap = Capacity(self.index, make_policy(policy, layout), budget, headroom=headroom)
        self.n = 0
        self._name: dict[bytes, str] = {}

    def keys(self, ids):
        return request_keys(self.layout, tuple(ids))

    def request(self, ids, tail: int = 5):
        """Hit, load, offer the rest, store what is admitted. Returns (hit, plan, evicted)."""
        keys = self.keys(ids)
        num_tokens = len(ids) * C + tail
        hit = servable_tokens(self.layout.groups, lambda g, i: keys[g][i] in self.index,
                              num_tokens, align_tokens=align_of(self.layout))
        loaded = hit_keys(self.layout, keys, hit)
        for k in loaded:
            self.index.pin(k)
        self.cap.policy.on_load(loaded, self.index)
        for k in loaded:
            self.index.unpin(k)
        positions = {k: (i + 1) * C for ks in keys.values() for i, k in enumerate(ks)}
        batch = [Candidate(k, gi, (i + 1) * C, self.layout.group(gi).chunk_bytes,
                           ks[i - 1] if i else None)
                 for gi, ks in keys.items() for i, k in enumerate(ks)
                 if (i + 1) * C > hit and k not in self.index]
        rid = f"r{self.n}"
        self.n += 1
        plan = self.cap.plan_store(batch, RequestView(rid, positions, num_tokens))
        evicted = list(plan.evicted)
        for cand in plan.admitted:
            evicted += self.cap.commit(cand.key, size=cand.size, position=cand.position,
                                       parent=cand.parent)
        self.cap.request_finished(rid)
        return hit, plan, evicted

    def names(self, keys) -> set[str]:
        """Readable names: 'F' / 'W' / 'S' + the prefix ids, e.g. 'F01' for chunk (0, 1)."""
        return {self._name.get(key, key.hex()[:8]) for key in keys}

    def stored(self) -> set[str]:
        return self.names(e.key for e in self.index)

    def name_all(self, *prompts) -> None:
        tag = {FULL: "F", SLIDING: "W", STATE: "S"}
        for ids in prompts:
            for gi, ks in self.keys(ids).items():
                for i, k in enumerate(ks):
                    self._name[k] = tag[self.layout.group(gi).kind] + "".join(
                        map(str, ids[:i + 1]))


def request_context(name: str, keys: dict[int, list[bytes]]) -> ReqContext:
    """vLLM's request context for ``keys`` (``request_keys``): chunk i of each group ends at
    token (i + 1) * C."""
    ctx = ReqContext(req_id=name)
    for group_keys in keys.values():
        for i, key in enumerate(group_keys):
            ctx.set_offload_key_position(key, (i + 1) * C)
    return ctx


def make_manager(tmp_path, layout, policy="group_aware", budget=None) -> HybridKVManager:
    store = ChunkStore(tmp_path, layout)
    store.ensure_dirs()
    config = HybridKVConfig(cache_dir=str(tmp_path), disk_budget=budget, eviction_policy=policy)
    return HybridKVManager(store, config, policy=make_policy(policy, layout))
