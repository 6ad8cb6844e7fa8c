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
tick in jiffies), every lookup miss re-checks the disk (no timed refresh), and
the service runs on a clock only the ``wait`` rule advances.

The floor variant gives the service a fake ``statvfs``: a filesystem a few chunks
larger than the budget whose used bytes are the chunk files plus what rules
``external_fill`` / ``external_free`` write beside them (another program), with
``min_free_space`` a few chunks, and ``no_space`` reports a failed write for lack
of space. On top of 1-5: a store admitted while the service's last free-space
probe is current (taken after the last external change) never takes the free
space below the floor; while the service backs off, nothing is admitted and
nothing evicted.

The fleet variant (``fleet="on"``, one engine) drives the same rules through the
fleet's lease, grants and directory syncs (listings run inline), so files deleted
behind the index's back are also found by a sync or by the stat before a HIT.

Hand-built cases live beside this file: ``test_capacity_admission.py``,
``test_capacity_eviction.py``, ``test_capacity_policies.py``; shared helpers in
``capacity_helpers.py``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
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

from hybridkv.config import HybridKVConfig
from hybridkv.groups import HybridLayout
from hybridkv.hit_rule import servable_tokens
from hybridkv.index import ChunkIndex
from hybridkv.keys import key_from_hex, key_group, make_key
from hybridkv.policies import make_policy
from hybridkv.store.chunk_store import ChunkStore
from hybridkv.store.format import ChunkMissing
from hybridkv.store.file_map import CHUNK_SUFFIX
from hybridkv.cache import HEADER_ALLOWANCE
from hybridkv.vllm.manager import HybridKVManager

from capacity_helpers import (
    C,
    FULL,
    SLIDING,
    STATE,
    align_of,
    chunk_hash,
    hit_keys,
    make_layout,
    make_manager,
    request_context,
    request_keys,
)

pytestmark = pytest.mark.fast


LAYOUTS = {
    "full+sliding": make_layout((FULL, SLIDING), window=40),
    "full+state": make_layout((FULL, STATE)),
    "full+sliding+state": make_layout((FULL, SLIDING, STATE), window=32),
}
POLICIES = ("group_aware", "lru", "watermark")


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


class InlineExecutor(Executor):
    """Runs each job at submit: the fleet's directory listings become deterministic."""

    def submit(self, fn, /, *args, **kwargs):
        future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, as a pool would
            future.set_exception(exc)
        return future


# ---------------------------------------------------------------------- the machine
class CapacityMachine(RuleBasedStateMachine):
    LAYOUT: HybridLayout = LAYOUTS["full+state"]
    POLICY: str = "group_aware"
    #: seconds between re-checks of a missed key on disk; tiny: every miss stats the file
    REFRESH: float = 1e-9
    #: one disk budget for the directory through the fleet (lease, grants, syncs)
    FLEET: bool = False
    #: a fake filesystem with a free-space floor (``min_free_space``) and external fills
    FLOOR: bool = False
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
        self.now = 1_000_000.0  # the service's clock (monotonic and wall): ``wait`` moves it
        self._keys_cache: dict[tuple[int, ...], dict[int, list[bytes]]] = {}

    # ------------------------------------------------------------------ setup
    def _new_manager(self) -> HybridKVManager:
        store = ChunkStore(self.dir, self.layout)
        store.ensure_dirs()
        clock = lambda: self.now  # noqa: E731
        extra = {"statvfs": self._statvfs} if self.FLOOR else {}
        return HybridKVManager(store, self.config, policy=make_policy(self.POLICY, self.layout),
                               clock=clock, wall_clock=clock, executor=InlineExecutor(),
                               **extra)

    # ------------------------------------------------------------------ the fake filesystem
    def _free(self) -> int:
        used = sum(p.stat().st_size for p in Path(self.dir).rglob("*") if p.is_file())
        return max(0, self.fs_total - used - self.external)

    def _statvfs(self, path: str) -> os.statvfs_result:
        free = self._free()
        return os.statvfs_result((1, 1, self.fs_total, free, free, 0, 0, 0, 0, 255))

    @initialize(budget_chunks=st.integers(3, 32), floor_chunks=st.integers(1, 4),
                slack_chunks=st.integers(-2, 6))
    def setup(self, budget_chunks: int, floor_chunks: int, slack_chunks: int) -> None:
        fa = self.layout.group(self.backbone)
        unit = fa.chunk_bytes + HEADER_ALLOWANCE
        self.budget = budget_chunks * unit
        floor = {}
        if self.FLOOR:  # the filesystem: budget + floor + slack (negative: the floor binds)
            self.fs_total = self.budget + (floor_chunks + slack_chunks) * unit + 8192
            self.external = 0
            self.fs_changed = float("-inf")  # clock time of the last external change
            floor = {"min_free_space": floor_chunks * unit}
        self.config = HybridKVConfig(cache_dir=self.dir, disk_budget=self.budget,
                                     eviction_policy=self.POLICY,
                                     refresh_interval=self.REFRESH, snapshot_interval=0,
                                     fleet="on" if self.FLEET else "off", **floor)
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
        # A chunk whose file vanished (or that depends on one) is dead and may go: the
        # fleet's sync and the stat before a HIT find those.
        if self.POLICY != "watermark":
            dead = {k for k in removed & storing
                    if k in self.deleted or self._deps(k) & self.deleted}
            assert not (removed & storing) - dead, \
                f"{what}: evicted a chunk of the storing request"
        # 3. no reachable chunk depends on an evicted one (group_aware only: lru may
        # strand chunks, that is the comparison). A chunk stranded before the call is
        # dead, not reachable, and not checked: a failed write left a hole in its
        # prefix, a file vanished behind the manager's back, or the budget skipped the
        # full-attention chunk at its position while a smaller window/state chunk
        # there still fit (plan_store admits by room, group by group). Dead chunks go
        # first when room is needed; they are not reclaimed eagerly.
        if self.POLICY == "group_aware":
            alive = before - self.deleted  # a chunk whose file vanished serves nothing
            for key in after - stranded_ok:
                deps = self._deps(key)
                lost = deps & removed
                assert not lost or not deps <= alive, (
                    f"{what}: {key.hex()[:8]} (group {key_group(key)}, prefix "
                    f"{self.meta[key][0]}) was reachable and stays stored, but chunk(s) it "
                    f"depends on were removed: {[self.meta[k][0] for k in lost]}")
        self.deleted &= after
        return removed

    def _call(self, fn, *args, storing: set[bytes] = frozenset(),
              stranded_ok: set[bytes] = frozenset()):
        self.now += 0.001  # each call takes a millisecond: no stat is trusted across calls
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
        # (a lookup may drop a vanished file's chunk: each is checked like any other call)
        table = {gi: [self._call(self.manager.lookup, k, ctx) is LookupResult.HIT
                      for k in gkeys] for gi, gkeys in keys.items()}
        req.hit = servable_tokens(self.groups, lambda g, i: table[g][i], req.num_tokens,
                                  align_tokens=align_of(self.layout))
        req.load = hit_keys(self.layout, keys, req.hit)
        # (with the fleet a lookup stats the file: a pinned chunk whose file vanished stays
        # indexed, as pins hold, but is a miss)
        gone = self.deleted if self.FLEET else set()
        assert req.hit == servable_tokens(
            self.groups, lambda g, i: keys[g][i] in self.index and keys[g][i] not in gone,
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
        floor = m.cache.disk_floor
        backing_off = self.FLOOR and floor.backing_off()
        before = {e.key for e in self.index}
        out = self._call(m.prepare_store, offer, ctx, storing=mine)
        if backing_off:  # the filesystem stays full: neither stores nor evictions
            assert not out.keys_to_store and {e.key for e in self.index} == before
            self._count("backed_off")
        current = self.FLOOR and floor.probed_at > self.fs_changed
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
            self.deleted.discard(key)  # stored again after a delete behind our back
            written.append(key)
        self._call(m.complete_store, out.keys_to_store, ctx, storing=mine)
        if current and written:  # the floor holds against what the service could know
            assert self._free() >= floor.floor, (self._free(), floor.floor)
            self._count("floor_checked")
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
        if self.FLEET:  # a clean stop hands the lease over (a crashed holder's lasts its ttl)
            self.manager.shutdown()
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

    @rule(seconds=st.sampled_from([0.3, 2.0, 6.0, 40.0]))
    def wait(self, seconds):
        """Time passes: trusted stats expire, the fleet's polls, syncs and lease renew."""
        self.now += seconds
        self._count("waits")

    @precondition(lambda self: self.FLOOR)
    @rule(share=st.sampled_from([0.3, 0.7, 1.0]))
    def external_fill(self, share):
        """Another program writes beside the cache: ``share`` of the free space."""
        self.external += int(self._free() * share)
        self.fs_changed = self.now
        self._count("external_fills")

    @precondition(lambda self: self.FLOOR)
    @rule()
    def external_free(self):
        self.external = 0
        self.fs_changed = self.now

    @precondition(lambda self: self.FLOOR)
    @rule()
    def no_space(self):
        """A worker's write failed with ENOSPC/EDQUOT (reported through the connector)."""
        self._call(self.manager.cache.store_failed_no_space, 1)
        self._count("no_space")

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
        assert set(files) == keys - self.deleted, (
            "index and directory differ: files not indexed "
            f"{[self.meta[k] for k in set(files) - keys]}, indexed without a file "
            f"{[self.meta[k] for k in keys - self.deleted - set(files)]}; counters "
            f"{self.manager.counters.snapshot()}")
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


def run_machine(name: str, **attrs) -> dict[str, int]:
    """Run a ``CapacityMachine`` variant; returns what happened how often (``seen``)."""
    machine = type(name, (CapacityMachine,), {**attrs, "seen": {}})
    run_state_machine_as_test(machine, settings=settings(
        max_examples=10, stateful_step_count=25, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
    seen = machine.seen
    assert seen.get("hits", 0) > 0 and seen.get("removed", 0) > 0, seen
    return seen


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_capacity_state_machine(layout_name, policy):
    run_machine(f"Capacity_{layout_name.replace('+', '_')}_{policy}",
                LAYOUT=LAYOUTS[layout_name], POLICY=policy)


@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_capacity_state_machine_with_a_floor_and_external_fills(layout_name):
    seen = run_machine(f"Floor_{layout_name.replace('+', '_')}",
                       LAYOUT=LAYOUTS[layout_name], FLOOR=True)
    assert seen.get("external_fills", 0) > 0 and seen.get("floor_checked", 0) > 0, seen


@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_capacity_state_machine_with_the_fleet(layout_name):
    seen = run_machine(f"Fleet_{layout_name.replace('+', '_')}",
                       LAYOUT=LAYOUTS[layout_name], FLEET=True)
    assert seen.get("external_deletes", 0) > 0 and seen.get("waits", 0) > 0, seen


def test_failed_load_reclaims_the_orphans_it_pinned(tmp_path):
    layout = make_layout((FULL, STATE))
    m = make_manager(tmp_path, layout)
    keys = request_keys(layout, (0, 1))
    full, state = keys[0], keys[1]

    def ctx(name):
        return request_context(name, keys)

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
