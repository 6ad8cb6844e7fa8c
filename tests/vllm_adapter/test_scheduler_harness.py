"""hybridkv under vLLM's real Scheduler, for hybrids the CPU backend cannot run.

Each test runs an engine (real ``Scheduler`` + ``HybridKVConnector`` on both
sides, fake forward pass; see ``tests/harness.py``) over a hand-built
``KVCacheConfig``, lets it store to a cache directory, then starts a SECOND
engine with fresh KV tensors on the same directory (a restart) and serves the
same prompts one at a time, so every hit comes from disk. The harness checks,
before each request's first forward, that every block the model reads holds
the bytes of its prefix (all full-attention blocks, the sliding-window blocks
in the window, the Mamba state block at the start position) and that every
loaded block equals the rows of the chunk file it came from.
"""

from __future__ import annotations

import os

import pytest

import harness as H
from harness import PROMPTS, first_run, jamba_specs, oracle_hit

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return H.write_tiny_model(tmp_path_factory.mktemp("model"))


def engine(model_dir, cache_dir, specs, *, block_size, retention_interval=None, **settings):
    config = H.make_vllm_config(model_dir, cache_dir, block_size=block_size,
                                max_num_batched_tokens=64,
                                retention_interval=retention_interval, **settings)
    return H.Engine(config, specs)


def chunk_files(cache_dir) -> int:
    return sum(f.endswith(".safetensors") for _, _, fs in os.walk(cache_dir) for f in fs)


def restart_and_check(make, *, expect_hits=None, must_hit=tuple(PROMPTS)):
    """Serve every prompt on a fresh engine; return it after the common checks."""
    e = make()
    for req_id, prompt in PROMPTS.items():
        expected = oracle_hit(e, prompt)  # before serving: serving stores more
        e.serve({req_id: prompt})
        hit = e.external_tokens.get(req_id, 0)
        assert hit == expected, req_id
        assert e.start_tokens[req_id] == hit  # nothing local: all of it came from disk
        if expect_hits:
            assert hit == expect_hits[req_id], req_id
        if req_id in must_hit:
            assert hit > 0, f"{req_id}: no hit from disk after restart"
        elif not hit:
            continue
        (load,) = [ld for ld in e.loads if ld.req_id == req_id]
        assert load.verified
        for gid, first, ids in load.groups:
            g = e.groups[gid]
            bs = g.block_size
            if g.kind == "full":
                assert (first, len(ids)) == (0, hit // bs), (req_id, gid)
            elif g.kind == "state":
                assert (first, len(ids)) == (hit // bs - 1, 1), (req_id, gid)
            else:  # only the window, never the whole prefix
                assert 0 < len(ids) <= -(-g.window // bs) + 1 and first + len(ids) == hit // bs
    assert e.manager.counters.get("tokens_from_disk") == sum(e.external_tokens.values())
    return e


# ------------------------------------------------------------------ Jamba-style
def test_jamba_restart_restores_attention_and_every_mamba_group(model_dir, tmp_path):
    specs, block = jamba_specs()
    assert block == 32  # the attention block is raised so a page holds a Mamba state

    def make():
        return engine(model_dir, tmp_path / "kv", specs, block_size=block)

    first = first_run(make)
    kinds = [g.kind for g in first.groups]
    assert kinds.count("state") == 7 and kinds.count("full") == 1  # 1 attention : 7 Mamba
    assert first.start_tokens["b"] > 0  # b reused a's prefix from HBM in the first run
    # the hit point is the last Mamba block boundary before the last prompt token
    expect = {r: (len(p) - 1) // block * block for r, p in PROMPTS.items()}
    restart_and_check(make, expect_hits=expect).shutdown()


def test_mamba2_with_two_blocks_per_chunk(model_dir, tmp_path):
    """Two engine blocks per chunk file: a Mamba chunk holds its state block at
    offset 1. vLLM offers a Mamba state only where a prefill step ended on a
    chunk boundary, so a prompt whose steps never did (c) gets no hit."""
    specs, block = jamba_specs(H.mamba2)

    def make():
        return engine(model_dir, tmp_path / "kv", specs, block_size=block, blocks_per_chunk=2)

    first_run(make)
    e = restart_and_check(make, must_hit=("a", "b"))
    for req_id in PROMPTS:
        assert e.external_tokens.get(req_id, 0) % (2 * block) == 0
    e.shutdown()


def test_mamba_block_larger_than_attention_block_is_refused(model_dir, tmp_path):
    """Mamba blocks of 64 tokens next to 16-token attention blocks. vLLM never
    configures this (under prefix caching the Mamba block equals the attention
    block), and its align-mode scheduler splits prefills at the smallest block
    size, so a 64-token Mamba block would be stored holding a state taken at a
    non-boundary. hybridkv refuses the layout at start instead of storing it."""
    from hybridkv.config import ConfigError

    specs = H.jamba_layers(16, 64)
    with pytest.raises(ConfigError, match="state groups"):
        engine(model_dir, tmp_path / "kv", specs, block_size=16)


# ------------------------------------------------------------------ Gemma-style
@pytest.mark.parametrize("blocks_per_chunk", [1, 2])
def test_gemma_restart_loads_only_the_window(model_dir, tmp_path, blocks_per_chunk):
    specs = H.gemma_layers(16, window=40)
    chunk = 16 * blocks_per_chunk

    def make():
        return engine(model_dir, tmp_path / "kv", specs, block_size=16,
                      blocks_per_chunk=blocks_per_chunk)

    first_run(make)
    e = restart_and_check(make, expect_hits={r: (len(p) - 1) // chunk * chunk
                                             for r, p in PROMPTS.items()})
    assert [g.kind for g in e.groups].count("sliding") == 5
    e.shutdown()


def test_gemma_default_retention_stores_only_reachable_windows(model_dir, tmp_path):
    """vLLM's default retention (0) offloads sliding-window blocks only where a
    later hit can use them: far fewer files, same hits for the same prompts."""
    specs = H.gemma_layers(16, window=40)
    dense, sparse = tmp_path / "dense", tmp_path / "sparse"
    first_run(lambda: engine(model_dir, dense, specs, block_size=16))
    first_run(lambda: engine(model_dir, sparse, specs, block_size=16, retention_interval=0))
    assert chunk_files(sparse) < chunk_files(dense)
    restart_and_check(lambda: engine(model_dir, sparse, specs, block_size=16,
                                     retention_interval=0)).shutdown()


# ------------------------------------------------------------------ full + sliding + Mamba
def test_mixed_full_sliding_mamba_restart(model_dir, tmp_path):
    specs = H.mixed_layers(32, window=48)

    def make():
        return engine(model_dir, tmp_path / "kv", specs, block_size=32)

    first_run(make)
    e = restart_and_check(make)
    assert sorted(g.kind for g in e.groups) == ["full", "sliding", "state", "state"]
    e.shutdown()


# ------------------------------------------------------------------ every group or no hit
@pytest.mark.parametrize("model,kind", [("jamba", "state"), ("mixed", "state"),
                                        ("mixed", "sliding"), ("mixed", "full")])
def test_hit_needs_every_group(model_dir, tmp_path, model, kind):
    """Delete one chunk file of ONE group at/under the hit point: the hit a
    restarted engine reports shrinks to what every group can still serve (the
    bytes it loads are checked as always). With that group's chunks all gone,
    the hit drops to nothing."""
    if model == "jamba":
        specs, block = jamba_specs()
    else:
        specs, block = H.mixed_layers(32, window=48), 32

    def make():
        return engine(model_dir, tmp_path / "kv", specs, block_size=block)

    first_run(make)
    prompt = PROMPTS["a"]
    probe = make()
    full_hit = oracle_hit(probe, prompt)
    g = [g for g in probe.groups if g.kind == kind][-1]  # for Jamba: Mamba group 7 of 7
    chunk = g.block_size * probe.blocks_per_chunk
    victim_end = full_hit if kind != "full" else full_hit // 2 // chunk * chunk
    probe.chunk_path(prompt, g.gid, victim_end).unlink()
    shrunk = oracle_hit(probe, prompt)
    probe.shutdown()
    assert 0 < shrunk < full_hit

    e = make()
    e.serve({"a": prompt})
    assert e.external_tokens["a"] == shrunk
    if kind == "full":
        assert shrunk < victim_end
    e.shutdown()

    # remove every chunk of that group for this prompt: no hit at all
    for end in range(chunk, len(prompt), chunk):
        path = probe.chunk_path(prompt, g.gid, end)
        if path.exists():
            path.unlink()
    e = make()
    e.serve({"a": prompt})
    assert "a" not in e.external_tokens and e.start_tokens["a"] == 0
    e.shutdown()


# ------------------------------------------------------------------ failed loads
def test_chunk_vanishing_before_load_is_recomputed(model_dir, tmp_path):
    """A chunk the index lists disappears before its load (another engine
    evicted it). The load job fails; the engine must not die (vLLM's own
    offloading worker asserts every job succeeded): the request comes back as
    ``failed_recving``, is recomputed from scratch, and the lost chunk is
    stored again."""
    specs, block = jamba_specs()

    def make():
        # no snapshot: the start-up scan indexes every chunk, and no first-HIT stat
        # catches the deletion below (with a snapshot it is a shorter hit, tested in
        # test_snapshot.py), so the vanishing happens between lookup and load
        return engine(model_dir, tmp_path / "kv", specs, block_size=block, snapshot_interval=0)

    first_run(make)
    e = make()  # its index lists every chunk
    prompt = PROMPTS["c"]
    hit = oracle_hit(e, prompt)
    mamba = next(g for g in e.groups if g.kind == "state")
    victim = e.chunk_path(prompt, mamba.gid, hit)
    victim.unlink()
    e.serve({"c": prompt})
    assert e.external_tokens["c"] == hit  # the scheduler believed the index...
    assert e.start_tokens["c"] == 0  # ...the load failed, and c was recomputed
    assert e.manager.counters.get("requests_load_failed") == 1
    assert victim.exists()  # stored again by the recompute
    e.shutdown()

    again = make()  # and the next engine gets the full hit with the right bytes
    again.serve({"c": prompt})
    assert again.external_tokens["c"] == again.start_tokens["c"] == hit
    again.shutdown()
