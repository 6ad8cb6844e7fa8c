"""Capacity properties: random store / lookup / load / evict / restart sequences.

A Hypothesis state machine drives the REAL ``HybridKVManager`` (vLLM's
``OffloadingManager``) over a real ``ChunkStore`` in a temporary directory,
the way vLLM's scheduler and the offloading worker do: look up every key of a
request, load the hit every group can serve (``hit_rule.servable_tokens``),
read the loaded files back, offer the chunks past the hit, write what the
manager admits (sometimes failing one write), complete the store, finish the
request. Extra rules start a load and leave it in flight while other requests
store (pins), restart the manager on the same directory, and delete files
behind the manager's back (another engine evicting them).

Prompts are paths in a small tree of chunk ids (depth <= 6, branching <= 3),
so prefixes are shared; a chunk's hash is a digest of the ids up to it. One
chunk is one block (16 tokens). Layouts: full + sliding window, full + state,
full + sliding + state; policies: group_aware, lru, watermark; the budget is a
handful of chunks.

Invariants (checked after every rule, and around every manager call):
1. a reported hit is servable: every key it loads is in the index and its file
   is on disk and reads back the bytes written for it (or, if another engine
   deleted it, the read fails closed with ChunkMissing and ``complete_load``
   drops it);
2. the budget holds, in the index and in the bytes of chunk files on disk;
3. (group_aware) no reachable chunk depends on an evicted one: a manager call
   that removes a chunk also removes every chunk that was reachable through
   it (deeper full-attention chunks, window and state chunks on its prefix).
   One known exception is exempted: see
   ``test_failed_load_reclaims_the_orphans_it_pinned``;
4. pinned chunks (loads in flight) are never evicted, and (except for the
   watermark cleaner) chunks of a request that is storing are never evicted
   under it;
5. the index is the directory: its keys are the chunk files (minus files
   deleted behind its back), sizes equal file sizes, and after a restart each
   entry's group / position / parent equal the file header.

Runs are deterministic (Hypothesis replays a failure exactly): every file gets
its own mtime in write order (a restart rebuilds recency from mtimes, which
tick in jiffies), and every lookup miss re-checks the disk (no timed refresh).

Plain example tests below pin group-aware behaviour down on hand-built cases.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from vllm.v1.kv_offload.base import LookupResult, ReqContext

from hybridkv.capacity import Capacity
from hybridkv.config import HybridKVConfig
from hybridkv.groups import GroupKind, GroupSpec, HybridLayout
from hybridkv.hit_rule import load_window_chunks, servable_tokens
from hybridkv.index import ChunkIndex
from hybridkv.keys import key_from_hex, key_group, make_key
from hybridkv.policies import Admission, Candidate, RequestView, make_policy
from hybridkv.store.chunk_store import ChunkStore
from hybridkv.store.format import ChunkMissing
from hybridkv.store.paths import CHUNK_SUFFIX
from hybridkv.vllm.manager import HEADER_ALLOWANCE, HybridKVManager

pytestmark = pytest.mark.fast

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


LAYOUTS = {
    "full+sliding": make_layout((FULL, SLIDING), window=40),
    "full+state": make_layout((FULL, STATE)),
    "full+sliding+state": make_layout((FULL, SLIDING, STATE), window=32),
}
POLICIES = ("group_aware", "lru", "watermark")


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


def payload(layout: HybridLayout, key: bytes, seed: int) -> list[np.ndarray]:
    g = layout.group(key_group(key))
    blocks = 1 if g.kind is STATE else g.blocks_per_chunk
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (blocks, g.page_bytes), dtype=np.uint8)
            for _ in g.layer_names]


def chunk_files(store: ChunkStore) -> dict[bytes, Path]:
    """key -> path of every chunk file of the layout (``r0/g*/??/*.safetensors``)."""
    out = {}
    for path in store.paths.layout_dir.glob(f"r0/g*/??/*{CHUNK_SUFFIX}"):
        out[key_from_hex(path.name[:-len(CHUNK_SUFFIX)])] = path
    return out


@dataclass
class Req:
    ctx: ReqContext
    ids: tuple[int, ...]
    keys: dict[int, list[bytes]]
    num_tokens: int
    hit: int = 0
    load: list[bytes] = field(default_factory=list)

    @property
    def all_keys(self) -> set[bytes]:
        return {k for ks in self.keys.values() for k in ks}


# ---------------------------------------------------------------------- the machine
class CapacityMachine(RuleBasedStateMachine):
    LAYOUT: HybridLayout = LAYOUTS["full+state"]
    POLICY: str = "group_aware"
    #: seconds between re-checks of a missed key on disk; tiny: every miss stats the file
    REFRESH: float = 1e-9
    #: per test run: how often the interesting things happened (the test is not vacuous)
    seen: dict[str, int] = {}

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="hkv-props-")
        self.layout = self.LAYOUT
        self.groups = self.layout.groups
        self.backbone = self.layout.groups_of(FULL)[0].index
        self.manager: HybridKVManager | None = None
        self.payloads: dict[bytes, list[np.ndarray]] = {}  # key -> arrays last written
        self.meta: dict[bytes, tuple[tuple[int, ...], int]] = {}  # key -> (prefix ids, group)
        self.deleted: set[bytes] = set()  # indexed keys whose file another engine deleted
        self.prompts: list[tuple[tuple[int, ...], int]] = []  # distinct (ids, tail) seen
        self.inflight: list[Req] = []  # loads prepared, not completed
        self.n = 0
        self.writes = 0
        self.fresh = 3  # chunk ids >= 3 start prefixes no other request shares
        self._keys_cache: dict[tuple[int, ...], dict[int, list[bytes]]] = {}

    # ------------------------------------------------------------------ setup
    def _new_manager(self) -> HybridKVManager:
        store = ChunkStore(self.dir, self.layout)
        store.ensure_dirs()
        return HybridKVManager(store, self.config, policy=make_policy(self.POLICY, self.layout))

    @initialize(budget_chunks=st.integers(3, 32))
    def setup(self, budget_chunks: int) -> None:
        fa = self.layout.group(self.backbone)
        self.budget = budget_chunks * (fa.chunk_bytes + HEADER_ALLOWANCE)
        self.config = HybridKVConfig(cache_dir=self.dir, disk_budget=self.budget,
                                     eviction_policy=self.POLICY,
                                     refresh_interval=self.REFRESH)
        self.manager = self._new_manager()

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def store(self) -> ChunkStore:
        return self.manager.store

    @property
    def index(self) -> ChunkIndex:
        return self.manager.index

    def _count(self, what: str, n: int = 1) -> None:
        self.seen[what] = self.seen.get(what, 0) + n

    # ------------------------------------------------------------------ prompts
    def _draw_prompt(self, data) -> tuple[tuple[int, ...], int]:
        if self.prompts and data.draw(st.booleans(), label="reuse a prefix"):
            base = data.draw(st.sampled_from(self.prompts), label="base")[0]
            cut = data.draw(st.integers(1, len(base)), label="cut")
            ext = data.draw(st.lists(st.integers(0, 2), max_size=6 - cut), label="ext")
            ids = base[:cut] + tuple(ext)
        else:
            ids = tuple(data.draw(st.lists(st.integers(0, 2), min_size=1, max_size=6),
                                  label="ids"))
        tail = data.draw(st.sampled_from([0, 1, 9]), label="tail")
        return ids, tail

    def _fresh_prompt(self, data) -> tuple[tuple[int, ...], int]:
        """A prompt no stored prefix shares: its stores need room."""
        self.fresh += 1
        rest = data.draw(st.lists(st.integers(0, 2), min_size=2, max_size=5), label="fresh")
        return (self.fresh, *rest), data.draw(st.sampled_from([0, 1, 9]), label="tail")

    # ------------------------------------------------------------------ manager calls
    def _pinned(self) -> set[bytes]:
        return {k for r in self.inflight for k in r.load}

    def _deps(self, key: bytes) -> set[bytes]:
        """The chunks ``key`` can serve only with: its full-attention prefix (and position)."""
        prefix, group = self.meta[key]
        deps = {make_key(chunk_hash(prefix[:i]), self.backbone) for i in range(1, len(prefix))}
        if group != self.backbone:
            deps.add(make_key(chunk_hash(prefix), self.backbone))
        return deps

    def _check_removal(self, before: set[bytes], after: set[bytes], *,
                       storing: set[bytes] = frozenset(), stranded_ok: set[bytes] = frozenset(),
                       what: str) -> set[bytes]:
        removed = before - after
        self._count("removed", len(removed))
        for key in removed:
            assert not self.store.exists(key), f"{what}: evicted chunk's file is still on disk"
        # 4. pins hold: a chunk being loaded is never evicted
        assert not removed & self._pinned(), f"{what}: evicted a pinned chunk"
        if removed and self._pinned():
            self._count("removed_while_pinned")
        # 4'. the storing request's own chunks are not evicted under it (Capacity:
        # "chunks of open requests are never chosen as victims"). Not for watermark:
        # its cleaner (Capacity.enforce -> policy.cleanup, like llm-d's) does not know
        # requests and may delete the chunk a request committed a moment ago.
        if self.POLICY != "watermark":
            assert not removed & storing, f"{what}: evicted a chunk of the storing request"
        # 3. no reachable chunk depends on an evicted one (group_aware only: lru may
        # strand chunks, that is the comparison). A chunk stranded before the call is
        # dead, not reachable, and not checked: a failed write left a hole in its
        # prefix, a file vanished behind the manager's back, or the budget skipped the
        # full-attention chunk at its position while a smaller window/state chunk
        # there still fit (plan_store admits by room, group by group). Dead chunks go
        # first when room is needed; they are not reclaimed eagerly.
        if self.POLICY == "group_aware":
            for key in after - stranded_ok:
                deps = self._deps(key)
                lost = deps & removed
                assert not lost or not deps <= before, (
                    f"{what}: {key.hex()[:8]} (group {key_group(key)}, prefix "
                    f"{self.meta[key][0]}) was reachable and stays stored, but chunk(s) it "
                    f"depends on were removed: {[self.meta[k][0] for k in lost]}")
        self.deleted &= after
        return removed

    def _call(self, fn, *args, storing: set[bytes] = frozenset(),
              stranded_ok: set[bytes] = frozenset()):
        before = {e.key for e in self.index}
        out = fn(*args)
        self._check_removal(before, {e.key for e in self.index}, storing=storing,
                            stranded_ok=stranded_ok, what=fn.__name__)
        return out

    # ------------------------------------------------------------------ request phases
    def _begin(self, ids: tuple[int, ...], tail: int) -> Req:
        if (ids, tail) not in self.prompts:
            self.prompts.append((ids, tail))
        ctx = ReqContext(req_id=f"req-{self.n}")
        self.n += 1
        keys = self._keys_of(ids)
        for gi, gkeys in keys.items():
            for i, key in enumerate(gkeys):
                ctx.set_offload_key_position(key, (i + 1) * C)
                self.meta[key] = (ids[:i + 1], gi)
        req = Req(ctx, ids, keys, len(ids) * C + tail)
        # vLLM looks the keys up, then loads the hit every group can serve
        table = {gi: [self.manager.lookup(k, ctx) is LookupResult.HIT for k in gkeys]
                 for gi, gkeys in keys.items()}
        req.hit = servable_tokens(self.groups, lambda g, i: table[g][i], req.num_tokens,
                                  align_tokens=align_of(self.layout))
        req.load = hit_keys(self.layout, keys, req.hit)
        assert req.hit == servable_tokens(self.groups, lambda g, i: keys[g][i] in self.index,
                                          req.num_tokens, align_tokens=align_of(self.layout))
        # 1. every chunk the hit needs is indexed and on disk (or deleted behind our back)
        for key in req.load:
            assert key in self.index, "a hit needs a chunk the index does not hold"
            assert self.store.exists(key) or key in self.deleted, "a hit needs a missing file"
        self._call(self.manager.prepare_load, req.load, ctx)
        for key in req.load:
            assert self.index.get(key).pins > 0
        if req.hit:
            self._count("hits")
        return req

    def _complete_load(self, req: Req) -> bool:
        """Read what was loaded, then complete the load. Returns whether a read failed."""
        failed = []
        for key in req.load:
            if key in self.deleted:
                with pytest.raises(ChunkMissing):
                    self.store.read(key)
                failed.append(key)
                continue
            header, arrays = self.store.read(key)  # verifies key, group, checksum
            prefix, group = self.meta[key]
            assert header.position == len(prefix) * C and header.group == group
            assert header.parent == (
                make_key(chunk_hash(prefix[:-1]), group).hex() if len(prefix) > 1 else None)
            want = self.payloads[key]
            assert len(arrays) == len(want)
            assert all(np.array_equal(a, b) for a, b in zip(arrays, want)), \
                "a loaded chunk returned other bytes than were written for it"
        self._call(self.manager.complete_load, req.load, req.ctx, stranded_ok=set())
        still_pinned = self._pinned()
        for key in failed:
            self._count("failed_loads")
            if key not in still_pinned:
                assert key not in self.index, "complete_load kept a chunk whose file is gone"
        return bool(failed)

    def _store(self, req: Req, start: int, skip: int | None) -> None:
        m = self.manager
        ctx = req.ctx
        positions = {k: (i + 1) * C for ks in req.keys.values() for i, k in enumerate(ks)}
        offer = [k for gi, ks in req.keys.items() for i, k in enumerate(ks) if (i + 1) * C > start]
        mine = req.all_keys
        out = self._call(m.prepare_store, offer, ctx, storing=mine)
        assert out is not None
        spec = out.store_spec
        assert list(out.keys_to_store) == spec.keys
        assert set(spec.keys) <= set(offer)
        if out.evicted_keys:
            self._count("evictions")
        for key in out.evicted_keys:
            assert not self.store.exists(key)
        # 2. reservations keep the budget
        assert self.index.bytes_used <= self.budget
        written, failed = [], []
        for i, (key, pos, parent) in enumerate(zip(spec.keys, spec.positions, spec.parents)):
            assert self.index.is_pending(key) and key not in self.index
            assert pos == positions[key]
            gi = key_group(key)
            j = pos // C - 1
            assert parent == (req.keys[gi][j - 1] if j else None)
            if skip is not None and i == skip % len(spec.keys):
                failed.append(key)  # the worker failed to write it
                self._count("failed_writes")
                continue
            self.writes += 1
            arrays = payload(self.layout, key, self.writes)
            assert self.store.write(key, position=pos, block_offset=0, arrays=arrays,
                                    parent=parent) > 0
            path = self.store.path(key)
            assert path.stat().st_size <= self.layout.group(gi).chunk_bytes + HEADER_ALLOWANCE
            # file times tick in jiffies: give each file its own mtime (write order), so the
            # recency a restart rebuilds from mtimes, hence every run, is deterministic
            os.utime(path, ns=(1_700_000_000_000_000_000 + self.writes * 1_000_000,) * 2)
            self.payloads[key] = arrays
            written.append(key)
        self._call(m.complete_store, out.keys_to_store, ctx, storing=mine)
        for key in failed:
            assert key not in self.index and not self.index.is_pending(key)
            assert not self.store.exists(key)
        for key in written:
            assert not self.index.is_pending(key)
            assert key in self.index or not self.store.exists(key)
        m.on_request_finished(ctx)

    def _finish(self, req: Req, skip: int | None) -> None:
        failed = self._complete_load(req)
        # after a failed load vLLM recomputes the request: offer every chunk again
        self._store(req, 0 if failed else req.hit, skip)

    # ------------------------------------------------------------------ rules
    @rule(data=st.data(), skip=st.one_of(st.none(), st.integers(0, 63)))
    def request(self, data, skip):
        ids, tail = self._draw_prompt(data)
        self._finish(self._begin(ids, tail), skip)

    @precondition(lambda self: self.prompts)
    @rule(data=st.data(), skip=st.one_of(st.none(), st.integers(0, 63)))
    def repeat(self, data, skip):
        """A prompt seen before, again (a retry, or the next turn with the same history)."""
        ids, tail = data.draw(st.sampled_from(self.prompts), label="again")
        self._finish(self._begin(ids, tail), skip)

    @precondition(lambda self: len(self.inflight) < 2)
    @rule(data=st.data())
    def begin_load(self, data):
        self.inflight.append(self._begin(*self._draw_prompt(data)))

    @precondition(lambda self: self.inflight)
    @rule(data=st.data(), skip=st.one_of(st.none(), st.integers(0, 63)))
    def end_load(self, data, skip):
        req = self.inflight.pop(data.draw(st.integers(0, len(self.inflight) - 1), label="which"))
        self._finish(req, skip)

    @rule(data=st.data())
    def interleaved(self, data):
        """A load in flight while another request's stores need eviction."""
        a = self._begin(*self._draw_prompt(data))
        self.inflight.append(a)
        b = self._begin(*self._fresh_prompt(data))
        self._finish(b, None)
        for key in a.load:  # pinned chunks survived, files included
            assert key in self.index and self.index.get(key).pins > 0
            assert self.store.exists(key) or key in self.deleted
        self.inflight.remove(a)
        self._finish(a, None)

    @rule()
    def restart(self):
        self.inflight.clear()  # the engine died with them
        before = {e.key for e in self.index} - self.deleted
        self.manager = self._new_manager()
        after = {e.key for e in self.index}
        assert after <= before, "a restart found chunks nobody stored"
        # a chunk left stranded by a file deleted behind the manager's back is
        # dead until the next eviction (not reclaimed at start): only chunks
        # reachable before the restart are checked
        self._check_removal(before, after, what="restart")
        self.deleted.clear()
        # 5. the index equals the directory, header by header
        files = chunk_files(self.store)
        assert set(files) == after
        for key, path in files.items():
            entry = self.index.get(key)
            header = self.store.header_of(path)
            prefix, group = self.meta[key]
            assert entry.size == path.stat().st_size
            assert entry.group == header.group == group == key_group(key)
            assert entry.position == header.position == len(prefix) * C
            parent = bytes.fromhex(header.parent) if header.parent else None
            assert entry.parent == parent
            assert parent == (make_key(chunk_hash(prefix[:-1]), group) if len(prefix) > 1
                              else None)
        self._count("restarts")

    @rule(data=st.data())
    def external_delete(self, data):
        files = chunk_files(self.store)
        if not files:
            return
        key = data.draw(st.sampled_from(sorted(files)), label="delete")
        files[key].unlink()
        self.deleted.add(key)
        self._count("external_deletes")

    # ------------------------------------------------------------------ invariants
    @invariant()
    def index_disk_and_hits_agree(self):
        """Invariants 1, 2, 4 and 5 from one listing of the directory."""
        if self.manager is None:
            return
        files = {k: p.stat().st_size for k, p in chunk_files(self.store).items()}
        idx = self.index
        keys = {e.key for e in idx}
        # 2. the budget holds: in the index (nothing left pending) and on disk
        assert idx.bytes_pending == 0 and not list(idx.pending())
        assert idx.bytes_stored == sum(e.size for e in idx)
        assert idx.bytes_used <= self.budget
        on_disk = sum(p.stat().st_size
                      for p in self.store.paths.layout_dir.rglob(f"*{CHUNK_SUFFIX}"))
        assert on_disk == sum(files.values()) <= self.budget
        # 5. the index is the directory (minus files deleted behind its back)
        assert self.deleted <= keys
        assert set(files) == keys - self.deleted
        for key, size in files.items():
            assert idx.get(key).size == size
        # 1. every hit a seen prompt would get now is servable from files
        for ids, tail in self.prompts:
            rkeys = self._keys_of(ids)
            hit = servable_tokens(self.groups, lambda g, i: rkeys[g][i] in idx,
                                  len(ids) * C + tail, align_tokens=align_of(self.layout))
            for key in hit_keys(self.layout, rkeys, hit):
                assert key in idx and (key in files or key in self.deleted)
        # 4. loads in flight keep their chunks
        for req in self.inflight:
            for key in req.load:
                entry = idx.get(key)
                assert entry is not None and entry.pins > 0
                assert key in files or key in self.deleted

    def _keys_of(self, ids: tuple[int, ...]) -> dict[int, list[bytes]]:
        got = self._keys_cache.get(ids)
        if got is None:
            got = self._keys_cache[ids] = request_keys(self.layout, ids)
        return got


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_capacity_state_machine(layout_name, policy):
    machine = type(f"Capacity_{layout_name.replace('+', '_')}_{policy}", (CapacityMachine,),
                   {"LAYOUT": LAYOUTS[layout_name], "POLICY": policy, "seen": {}})
    run_state_machine_as_test(machine, settings=settings(
        max_examples=10, stateful_step_count=25, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
    seen = machine.seen
    assert seen.get("hits", 0) > 0 and seen.get("removed", 0) > 0, seen


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


def test_group_aware_keeps_shared_prefix_and_newest_end_state():
    """Two requests share a prefix, then diverge; the budget fits one branch.

    Full attention + state, every chunk 100 bytes, budget 700 (7 chunks).
    A = 0 1 2 3 and B = 0 1 5 6, each with a 5-token tail (the hit point is
    the end, 64 tokens). A stores its spine and its end state (admitted), then
    spare states into free space, deepest first: 48 and 32 fit, 16 does not.
    B hits 32 tokens (spine 0 1 plus A's spare state at 32, now a checkpoint)
    and needs 300 bytes for its branch: the older branch's deeper chunks go
    (its spare state at 48 first: within a chunk of A's end it goes with its
    hit point, by utility), and B's end state and its spare state at 48 are
    stored. A third, unrelated request then needs 200 bytes: the least useful
    hit points go (the fork at 32, older than B's end, and B's spare point at
    48); the shared ancestors 0 and 0 1 stay because B's end still needs them.
    """
    layout = make_layout((FULL, STATE), pages=TINY, layers=ONE)
    sim = Sim(layout, "group_aware", 700)
    a, b = (0, 1, 2, 3), (0, 1, 5, 6)
    sim.name_all(a, b, (7,))

    hit, plan, evicted = sim.request(a)
    assert hit == 0 and not evicted
    assert sim.names(c.key for c in plan.admitted) == {
        "F0", "F01", "F012", "F0123", "S0123", "S012", "S01"}
    assert sim.names(c.key for c in plan.skipped) == {"S0"}  # spare, deepest first: no room
    assert {sim.names([c.key]).pop(): sim.index.get(c.key).spare for c in plan.admitted
            if c.group == 1} == {"S0123": False, "S012": True, "S01": True}

    hit, plan, evicted = sim.request(b)
    assert hit == 32  # spine 0 1 and the state at 32
    assert sim.names(evicted) == {"F012", "F0123", "S012", "S0123"}
    assert sim.stored() == {"F0", "F01", "S01", "F015", "F0156", "S0156", "S015"}
    assert sim.index.get(sim.keys(b)[1][2]).spare and not plan.skipped

    hit, plan, evicted = sim.request((7,))
    assert hit == 0 and sim.names(c.key for c in plan.admitted) == {"F7", "S7"}
    assert sim.names(evicted) == {"S01", "S015"}
    assert sim.stored() == {"F0", "F01", "F015", "F0156", "S0156", "F7", "S7"}
    assert sim.index.bytes_used == 700


@pytest.mark.parametrize("kinds", [(FULL, SLIDING, STATE), (FULL, STATE), (FULL, SLIDING)])
def test_removing_a_spine_chunk_reclaims_every_deeper_chunk_on_its_prefix(kinds):
    layout = make_layout(kinds, window=32, pages=TINY, layers=ONE)
    sim = Sim(layout, "group_aware", None)
    a, b, other = (0, 1, 2, 3), (0, 1, 4), (2, 2)
    sim.name_all(a, b, other)
    # every chunk of every group of three prompts is stored (two share the prefix 0 1)
    for ids in (a, b, other):
        for gi, ks in sim.keys(ids).items():
            for i, k in enumerate(ks):
                if k not in sim.index:
                    sim.index.add(k, group=gi, position=(i + 1) * C, size=100,
                                  parent=ks[i - 1] if i else None)
    before = sim.stored()
    pinned = sim.keys(b)[0][2]  # F014, being loaded
    sim.index.pin(pinned)

    tags = [{FULL: "F", SLIDING: "W", STATE: "S"}[k] for k in kinds]
    every = {t + p for t in tags for p in ("0", "01", "012", "0123", "014", "2", "22")}
    assert before == every

    removed = sim.names(sim.cap.remove([sim.keys(a)[0][1]]))  # F01

    # every deeper chunk of every group on prefix 0 1 (both branches) goes ...
    assert removed == {t + p for t in tags for p in ("01", "012", "0123", "014")} - {"F014"}
    # ... except a pinned one (being loaded: never removed, not even as an orphan);
    # the ancestor 0 and the unrelated prefix 2 2 stay
    assert sim.stored() == {"F014"} | {t + p for t in tags for p in ("0", "2", "22")}

    # a group-agnostic LRU removes only what it is told: the rest is stranded
    lru = Capacity(sim.index, make_policy("lru", layout), None)
    assert sim.names(lru.remove([sim.keys(other)[0][0]])) == {"F2"}
    assert "F22" in sim.stored()


def test_non_checkpoint_state_is_spare_and_goes_before_checkpoints():
    layout = make_layout((FULL, STATE), pages=TINY, layers=ONE)
    ids = (0, 1, 2, 3)
    sim = Sim(layout, "group_aware", 500)
    sim.name_all(ids, (5,), (6, 6))
    keys = sim.keys(ids)
    batch = [Candidate(k, gi, (i + 1) * C, 100, ks[i - 1] if i else None)
             for gi, ks in keys.items() for i, k in enumerate(ks)]
    view = RequestView("r", {c.key: c.position for c in batch}, len(ids) * C + 5)
    verdicts = dict(zip((sim.names([c.key]).pop() for c in batch),
                        sim.cap.policy.admit(batch, view, sim.index)))
    # only the state at the request end (the likely hit point) is a checkpoint
    assert verdicts == {"F0": Admission.ADMIT, "F01": Admission.ADMIT, "F012": Admission.ADMIT,
                        "F0123": Admission.ADMIT, "S0123": Admission.ADMIT,
                        "S0": Admission.SPARE, "S01": Admission.SPARE, "S012": Admission.SPARE}

    # the budget fits exactly the admitted chunks: spare states are skipped, nothing evicted
    _, plan, evicted = sim.request(ids)
    assert not evicted and sim.names(c.key for c in plan.skipped) == {"S0", "S01", "S012"}
    assert sim.stored() == {"F0", "F01", "F012", "F0123", "S0123"}
    # spare states alone never evict, even with the disk full
    spare = [c for c in batch if c.group == 1 and c.position < 64]
    plan = sim.cap.plan_store(spare, view)
    assert not plan.evicted and not plan.admitted and len(plan.skipped) == 3

    # with room to spare they are stored, flagged spare ...
    sim = Sim(layout, "group_aware", 700)
    sim.name_all(ids, (5,), (6, 6))
    sim.request(ids)
    assert sim.stored() == {"F0", "F01", "F012", "F0123", "S0123", "S012", "S01"}
    assert [sim.index.get(k).spare for k in sim.keys(ids)[1][1:3]] == [True, True]
    # ... and are the first to go: a request needing 200 bytes takes both, not the checkpoint
    # (the one at 16 as expendable, the one a chunk short of the end as the least useful point)
    _, plan, evicted = sim.request((5,))
    assert sim.names(evicted) == {"S01", "S012"}
    assert sim.stored() == {"F0", "F01", "F012", "F0123", "S0123", "F5", "S5"}
    # a checkpoint retired takes its whole spine once no other checkpoint needs it (in a
    # state model a spine without a state serves no hit); the newer checkpoint stays
    _, plan, evicted = sim.request((6, 6))
    assert sim.names(evicted) == {"F0", "F01", "F012", "F0123", "S0123"}
    assert sim.stored() == {"F5", "S5", "F6", "F66", "S6", "S66"}


def _manager(tmp_path, layout, policy="group_aware", budget=None) -> HybridKVManager:
    store = ChunkStore(tmp_path, layout)
    store.ensure_dirs()
    config = HybridKVConfig(cache_dir=str(tmp_path), disk_budget=budget, eviction_policy=policy)
    return HybridKVManager(store, config, policy=make_policy(policy, layout))



def test_failed_load_reclaims_the_orphans_it_pinned(tmp_path):
    layout = make_layout((FULL, STATE))
    m = _manager(tmp_path, layout)
    keys = request_keys(layout, (0, 1))
    full, state = keys[0], keys[1]

    def ctx(name):
        c = ReqContext(req_id=name)
        for ks in keys.values():
            for i, k in enumerate(ks):
                c.set_offload_key_position(k, (i + 1) * C)
        return c

    first = ctx("first")  # stores spine 0, 0 1 and the state at 0 1 (its end)
    out = m.prepare_store([*full, *state], first)
    for k, pos, parent in zip(out.store_spec.keys, out.store_spec.positions,
                              out.store_spec.parents):
        m.store.write(k, position=pos, block_offset=0, arrays=payload(layout, k, 0),
                      parent=parent)
    m.complete_store(out.keys_to_store, first)
    m.on_request_finished(first)
    assert {full[0], full[1], state[1]} <= {e.key for e in m.index}

    m.store.path(full[0]).unlink()  # another engine evicted the first spine chunk
    second = ctx("second")  # 0 1 plus a tail: the hit is 32 tokens
    load = [full[0], full[1], state[1]]
    m.prepare_load(load, second)
    with pytest.raises(ChunkMissing):
        m.store.read(full[0])
    m.complete_load(load, second)
    assert full[0] not in m.index  # dropped, and with it ...
    assert full[1] not in m.index and state[1] not in m.index  # ... its orphans


def test_chunks_past_a_spine_chunk_that_did_not_fit_are_skipped():
    """A window chunk at or past a full-attention chunk that did not fit could never be hit."""
    layout = make_layout((FULL, SLIDING), pages={FULL: 100, SLIDING: 50}, layers=ONE)
    sim = Sim(layout, "group_aware", 220)
    sim.name_all((0, 1))
    hit, plan, evicted = sim.request((0, 1))  # F0 + W0 = 150 bytes; F01 needs 100 more
    assert hit == 0 and not evicted
    assert sim.names(c.key for c in plan.admitted) == {"F0", "W0"}
    # W01 (50 bytes) would fit, but the spine breaks before it
    assert sim.names(c.key for c in plan.skipped) == {"F01", "W01"}
    assert sim.stored() == {"F0", "W0"}


def test_watermark_cleaner_spares_chunks_of_a_request_still_storing():
    layout = make_layout((FULL,), pages=TINY, layers=ONE)
    index = ChunkIndex()
    cap = Capacity(index, make_policy("watermark", layout), 1000)
    open_req, later = request_keys(layout, (0, 1, 2))[0], request_keys(layout, (5, 6, 7, 8, 9, 4))[0]

    def offer(rid, keys):
        batch = [Candidate(k, 0, (i + 1) * C, 100, keys[i - 1] if i else None)
                 for i, k in enumerate(keys)]
        return cap.plan_store(batch, RequestView(rid, {c.key: c.position for c in batch}))

    assert len(offer("open", open_req).admitted) == 3  # still storing: never finished
    for i, k in enumerate(open_req):
        cap.commit(k, size=100, position=(i + 1) * C, parent=open_req[i - 1] if i else None)
    assert len(offer("later", later).admitted) == 6
    for i, k in enumerate(later):  # both requests are storing: the cleaner finds nothing
        assert cap.commit(k, size=100, position=(i + 1) * C,
                          parent=later[i - 1] if i else None) == []
    cap.request_finished("later")
    evicted = cap.enforce()
    # 900 bytes > 85% of 1000: the cleaner went down to 70%; the open request's chunks are
    # the least recently used but are not touched, the finished one's oldest went
    assert evicted == later[:2] and index.bytes_used == 700
    assert all(k in index for k in open_req)
    cap.request_finished("open")
    assert set(cap.enforce()) == set()  # under the high watermark now: nothing more to do


def test_manager_uses_the_prompt_length_for_chunk_aligned_repeats(tmp_path):
    """A prompt of exactly two chunks: a repeat resumes at one chunk (its last token is
    recomputed), so the state there is a checkpoint, not a spare, once the connector
    told the manager the prompt length."""
    layout = make_layout((FULL, STATE))
    keys = request_keys(layout, (0, 1))

    def offer(m, name):
        ctx = ReqContext(req_id=name)
        for ks in keys.values():
            for i, k in enumerate(ks):
                ctx.set_offload_key_position(k, (i + 1) * C)
        m.prepare_store([*keys[0], *keys[1]], ctx)
        return {i: m.index.get_any(k).spare for i, k in enumerate(keys[1])}

    told = _manager(tmp_path / "told", layout)
    told.note_prompt_tokens("r", 2 * C)
    assert offer(told, "r") == {0: False, 1: False}
    untold = _manager(tmp_path / "untold", layout)
    assert offer(untold, "r") == {0: True, 1: False}
    told.on_request_finished(ReqContext(req_id="r"))
    assert "r" not in told._prompt_tokens


def test_a_spare_chunk_replaces_far_spare_ones_never_a_checkpoint():
    """A full disk still takes a spare chunk in place of a dead one or of a spare one far
    from its request's end (widest gap first), never a checkpoint, never a spare chunk
    within a chunk of a checkpoint (a follow-up that changes only the tail resumes there)."""
    layout = make_layout((FULL, STATE), pages=TINY, layers=ONE)
    ids, other = (0, 1, 2, 3, 4), (7, 8, 9)
    sim = Sim(layout, "group_aware", 900)
    sim.name_all(ids, other)
    _, plan, _ = sim.request(ids)
    # spare states go in deepest first: 64, 48 and 32 fit, 16 does not
    assert sim.stored() == {"F0", "F01", "F012", "F0123", "F01234", "S01234",
                            "S0123", "S012", "S01"}
    assert sim.names(c.key for c in plan.skipped) == {"S0"}

    keys = sim.keys(other)  # another request offers only its state at 16 (not its end: spare)
    s7 = Candidate(keys[1][0], 1, C, 100, None)
    view = RequestView("other", {k: (i + 1) * C for ks in keys.values()
                                 for i, k in enumerate(ks)}, len(other) * C + 5)
    assert sim.cap.policy.admit([s7], view, sim.index) == [Admission.SPARE]
    sim.index.touch(sim.keys(ids)[0][0])  # recency does not save the far spare state at 32
    plan = sim.cap.plan_store([s7], view)
    assert sim.names(c.key for c in plan.admitted) == {"S7"}
    assert sim.names(plan.evicted) == {"S01"}  # 48 tokens short of the end: the widest gap
    sim.cap.request_finished("other")

    # the budget holds the checkpoint and the spare state a chunk short of the end only:
    # nothing is expendable, the spare candidate is skipped, checkpoints stay
    for budget, kept in ((700, {"S0123"}), (600, set())):
        sim = Sim(layout, "group_aware", budget)
        sim.name_all(ids, other)
        sim.request(ids)
        assert sim.stored() == {"F0", "F01", "F012", "F0123", "F01234", "S01234"} | kept
        plan = sim.cap.plan_store([s7], view)
        assert not plan.admitted and not plan.evicted and len(plan.skipped) == 1


@pytest.mark.parametrize("policy", ["group_aware", "lru"])
def test_a_second_question_on_a_document_hits_a_chunk_short_of_the_first_end(policy):
    """Long-document questions: the second question diverges inside the first one's last
    chunk, so it resumes a chunk short of the first one's end, where only spare chunks
    (the state there, the window chunk just outside the end's window) serve it. They are
    stored before the far spares (deepest first) and are not expendable: later requests
    that need room for their checkpoints retire older hit points first, so the second
    question hits as it does under a group-agnostic LRU (it got 0 tokens when every spare
    chunk went before any checkpoint)."""
    layout = make_layout((FULL, SLIDING, STATE), window=32, pages=TINY, layers=ONE)
    doc, q1, q2 = (0, 1, 2, 3, 4, 5), (6,), (7,)
    older = [(30 + i,) for i in range(4)]
    fillers = [(10 + i,) for i in range(3)]
    sim = Sim(layout, policy, 3000)
    sim.name_all(doc + q1, doc + q2, *older, *fillers)
    for ids in (*older, doc + q1, *fillers):  # the fillers need room: eviction runs
        sim.request(ids)
    assert sim.names(k for ids in older for ks in sim.keys(ids).values() for k in ks) \
        - sim.stored()  # some older chunks went
    hit, _, _ = sim.request(doc + q2)
    assert hit == len(doc) * C


@pytest.mark.parametrize("policy", ["group_aware", "lru"])
def test_headroom_frees_more_than_needed_so_eviction_runs_rarely(policy):
    """Requests of 2 chunks each into a budget of 10: with 20% headroom an eviction frees
    the shortfall plus 2 chunks, so it runs on every other request instead of every one."""
    layout = make_layout((FULL,), pages=TINY, layers=ONE)
    calls = {}
    for headroom in (0.0, 0.2):
        sim = Sim(layout, policy, 1000, headroom=headroom)
        for n in range(20):
            sim.request((n, 100 + n))
            assert sim.index.bytes_used <= 1000
        calls[headroom] = sim.cap.victim_calls
    assert calls[0.0] == 15  # full after 5 requests, then one eviction per request
    assert calls[0.2] == 8
    with pytest.raises(ValueError, match="headroom"):
        Capacity(ChunkIndex(), make_policy(policy, layout), 1000, headroom=1.5)
