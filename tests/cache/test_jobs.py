"""``JobRunner`` over a real ``CacheService`` and chunk files (no vLLM): jobs are reported
once, loads hand over only verified chunks, a busy disk sheds stores, the caller's
thread never waits."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from hybridkv.cache import CacheService
from hybridkv.cache.jobs import JobRunner
from hybridkv.config import HybridKVConfig
from hybridkv.groups import GroupKind, GroupSpec, HybridLayout
from hybridkv.keys import make_key
from hybridkv.store.chunk_store import ChunkStore

pytestmark = pytest.mark.fast

LAYOUT = HybridLayout(model="jobs-test", dtype="bfloat16", groups=(
    GroupSpec(index=0, kind=GroupKind.FULL, block_tokens=16, chunk_tokens=16,
              layer_names=("l0", "l1"), page_bytes=512, dtype="bfloat16"),))


def key(i: int) -> bytes:
    return make_key(i.to_bytes(16, "little"), 0)


def pages(k: bytes) -> list[np.ndarray]:
    rng = np.random.default_rng(int.from_bytes(k[:8], "little"))
    return [rng.integers(0, 256, (1, 512), dtype=np.uint8) for _ in range(2)]


@pytest.fixture
def runner(tmp_path):
    store = ChunkStore(tmp_path, LAYOUT)
    store.ensure_dirs()
    service = CacheService(store, HybridKVConfig(cache_dir=str(tmp_path), refresh_interval=0,
                                                 snapshot_interval=0))
    r = JobRunner(service, io_threads=2, max_store_jobs=2)
    yield r
    r.close()


def wait_for(r: JobRunner, n: int, timeout: float = 10.0) -> list:
    out: list = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        out += r.finished()
        assert time.monotonic() < deadline, f"{len(out)} of {n} jobs reported"
        time.sleep(0.002)
    return out


def store(r: JobRunner, job: int, keys: list[bytes], read=pages) -> None:
    r.submit_store(job, keys, {k: 16 * (i + 1) for i, k in enumerate(keys)}, f"req{job}", read)


def test_every_job_is_reported_once_with_its_failures(runner):
    keys = [key(i) for i in range(4)]

    def read(k):
        if k == keys[2]:
            raise RuntimeError("the slot went away")
        return pages(k)

    store(runner, 1, keys, read)
    (out,) = wait_for(runner, 1)
    assert (out.job_id, out.ok, out.failed) == (1, True, [keys[2]])
    assert sorted(out.done) == sorted(keys[:2] + keys[3:])
    assert runner.lookup(keys[0]) is True and runner.lookup(keys[2]) is False

    got: dict[bytes, list[np.ndarray]] = {}

    def fill(k, header, arrays):
        if k == keys[3]:
            raise ValueError("does not fit the slot")
        got[k] = [a.copy() for a in arrays]

    runner.submit_load(2, [keys[0], keys[1], keys[3]], fill)
    (out,) = wait_for(runner, 1)
    assert out.is_load and out.done == [keys[0], keys[1]] and out.failed == [keys[3]]
    for k in (keys[0], keys[1]):
        assert all(np.array_equal(a, b) for a, b in zip(got[k], pages(k)))
    assert runner.finished() == [] and not runner.pending()


def test_a_corrupt_chunk_never_reaches_fill(runner):
    k = key(7)
    store(runner, 1, [k])
    wait_for(runner, 1)
    path = runner.store.path(k)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    seen = []
    runner.submit_load(2, [k], lambda k_, h, a: seen.append(k_))
    (out,) = wait_for(runner, 1)
    assert out.failed == [k] and seen == []
    runner.drain()
    deadline = time.monotonic() + 5
    while runner.lookup(k) is not False:  # quarantined: gone from the index
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_busy_disk_sheds_stores_and_the_caller_never_waits(runner):
    release = threading.Event()

    def slow(k):
        release.wait(10)
        return pages(k)

    started = time.perf_counter()
    for job in range(6):
        store(runner, job, [key(100 + job)], slow)
    assert runner.lookup(key(100)) is False  # answered while every I/O thread is stuck
    assert time.perf_counter() - started < 1.0
    release.set()
    outs = wait_for(runner, 6)
    assert sorted(o.job_id for o in outs) == list(range(6))
    shed = [o for o in outs if not o.done and not o.failed]
    assert len(shed) >= 3  # at most max_store_jobs (2) waiting or running past the first
    runner.drain()
    assert runner.service.counters.get("stores_dropped_busy") == len(shed)
