"""KV events for routers: a real `hybridkv serve` with vLLM's ZMQ event publisher on.

A subscriber decodes vLLM's ``KVEventBatch`` and sees hybridkv's stores of a prefix
(medium STORAGE, every group, with its kind and window, hashes that name the chunk
files) and, under a small disk budget, the removals of evicted chunks.
"""

from __future__ import annotations

import random
import time

import msgspec
import pytest

from served import kv_events_args, serve

pytestmark = pytest.mark.engine

# vLLM's spelling of each hybridkv kind in KV events
VLLM_KINDS = {"full_attention": "full_attention", "sliding_window": "sliding_window",
              "state": "mamba"}


class Subscriber:
    """vLLM's KV-event stream as a list, complete from the first batch: a SUB receives the
    live stream, and what it missed before its subscription reached the publisher (a PUB
    drops it) comes from the publisher's replay ROUTER, asked for every missing sequence
    number. No wait for the subscription."""

    def __init__(self, sources: dict):
        import zmq
        from vllm.distributed.kv_events import KVEventBatch

        self._zmq = zmq
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(sources["endpoint"])
        self.replay = self.ctx.socket(zmq.DEALER)
        self.replay.connect(sources["replay_endpoint"])
        self.decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        self.batches: dict[int, list] = {}  # seq -> events
        self.replayed = 0

    @property
    def events(self) -> list:
        return [e for seq in sorted(self.batches) for e in self.batches[seq]]

    def _add(self, seq: bytes, payload: bytes) -> bool:
        n = int.from_bytes(seq, "big", signed=True)
        if n < 0:  # the replay's end marker
            return False
        self.batches.setdefault(n, self.decoder.decode(payload).events)
        return True

    def drain(self, seconds: float) -> None:
        end = time.time() + seconds
        while (left := end - time.time()) > 0:
            if self.sock.poll(int(left * 1000) + 1):
                _topic, seq, payload = self.sock.recv_multipart()
                self._add(seq, payload)

    def fill(self, timeout: float = 30) -> None:
        """Ask the replay ROUTER for every batch from the first missing sequence number on."""
        first_missing = next(n for n in range(len(self.batches) + 1) if n not in self.batches)
        self.replay.send_multipart([b"", first_missing.to_bytes(8, "big")])
        end = time.time() + timeout
        while True:
            assert self.replay.poll(max(1, int((end - time.time()) * 1000))), "no replay answer"
            _empty, _topic, seq, payload = self.replay.recv_multipart()
            if not self._add(seq, payload):
                return
            self.replayed += 1

    def wait_for(self, predicate, timeout: float = 60) -> None:
        end = time.time() + timeout
        while not predicate():
            assert time.time() < end, f"events seen: {self.events[-20:]}"
            self.drain(0.5)
            self.fill()

    def storage(self, kind: str) -> list:
        return [e for e in self.events if type(e).__name__ == kind and e.medium == "STORAGE"]

    def close(self) -> None:
        self.sock.close(0)
        self.replay.close(0)
        self.ctx.term()


def _event_hash(block_hash: bytes):
    """A chunk's hash as vLLM publishes it: an int (the low 64 bits) by default
    (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``), else the bytes."""
    from vllm import envs

    if envs.VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES:
        return int.from_bytes(block_hash, "big") & ((1 << 64) - 1)
    return block_hash


def _chunk_files(cache) -> set[tuple]:
    """(event hash, group) of every chunk file: the file name is the key's hex."""
    out = set()
    for path in cache.rglob("*.safetensors"):
        key = bytes.fromhex(path.stem)
        out.add((_event_hash(key[:-4]), int.from_bytes(key[-4:], "big")))
    return out


def test_stores_and_evictions_are_published_per_group(tmp_path, tiny_model):
    model = str(tiny_model("gemma3"))
    rng = random.Random(7)
    prompts = [[rng.randrange(4, 260) for _ in range(700)] for _ in range(5)]
    # tiny gemma3: 128-token blocks, chunks of ~64 KiB; 700 tokens store 5 full-attention
    # chunks and at most as many per sliding group: 2 MiB holds about two prompts
    with serve(tmp_path, model, "--disk-budget", "2MiB", *kv_events_args(replay=True)) as server:
        sub = Subscriber(server.kv_events())
        try:
            server.complete(prompts[0])
            groups = {g["index"]: g for g in server.layout()["groups"]}
            sub.wait_for(lambda: {e.group_idx for e in sub.storage("BlockStored")} == set(groups))

            stored = sub.storage("BlockStored")
            files = _chunk_files(server.cache)
            by_hash = {}
            for event in stored:
                group = groups[event.group_idx]
                assert event.kv_cache_spec_kind == VLLM_KINDS[group["kind"]], event
                assert event.kv_cache_spec_sliding_window == group["window_tokens"], event
                assert event.block_size == group["chunk_tokens"], event
                assert len(event.block_hashes) == 1, event
                (block_hash,) = event.block_hashes
                # the hash names the chunk file of that group
                assert (block_hash, event.group_idx) in files, event
                by_hash[(block_hash, event.group_idx)] = event
            full = [g for g, spec in groups.items() if spec["kind"] == "full_attention"]
            assert full
            for g in full:
                # the full-attention chain: 700 tokens = 5 whole chunks, each with its parent
                chain = [e for e in stored if e.group_idx == g]
                assert len(chain) == 700 // groups[g]["chunk_tokens"]
                roots = [e for e in chain if e.parent_block_hash is None]
                assert len(roots) == 1
                for e in chain:
                    if e.parent_block_hash is not None:
                        assert (e.parent_block_hash, g) in by_hash
            assert any(groups[e.group_idx]["window_tokens"] for e in stored)

            # more distinct prompts than the budget holds: chunks are evicted and published
            for prompt in prompts[1:]:
                server.complete(prompt)
            sub.wait_for(lambda: sub.storage("BlockRemoved"))

            def announced_equals_disk() -> bool:
                # every announced chunk is on disk unless its removal was announced
                # (stores finish asynchronously, so wait for the last ones)
                return stored_minus_removed() == _chunk_files(server.cache)

            def stored_minus_removed() -> set[str]:
                stored = {(h, e.group_idx)
                          for e in sub.storage("BlockStored") for h in e.block_hashes}
                removed = {(h, e.group_idx)
                           for e in sub.storage("BlockRemoved") for h in e.block_hashes}
                return stored - removed

            sub.wait_for(announced_equals_disk)
            stored_keys = {(h, e.group_idx)
                           for e in sub.storage("BlockStored") for h in e.block_hashes}
            files = _chunk_files(server.cache)
            for event in sub.storage("BlockRemoved"):
                assert event.group_idx in groups, event
                for block_hash in event.block_hashes:
                    key = (block_hash, event.group_idx)
                    assert key in stored_keys, event  # it was announced before
                    assert key not in files, event    # and its file is gone
        finally:
            sub.close()
