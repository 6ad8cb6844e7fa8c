"""Operator commands: hybridkv inspect / verify / gc / simulate (hybridkv.tools).

Cache directories are written through ChunkStore (the engine's writer), with a
corrupted file, a stale temp file, a quarantined file and a second layout; the
JSON reports are checked against what was written.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hybridkv.cli import main
from hybridkv.groups import GroupKind, GroupSpec, HybridLayout
from hybridkv.keys import key_group, make_key
from hybridkv.sim.layouts import SIM_MODELS
from hybridkv.sim.replay import replay, working_set_bytes
from hybridkv.sim.traces import Trace, load_jsonl, make_trace, save_jsonl
from hybridkv.store.chunk_store import ChunkStore
from hybridkv.store.file_map import tmp_name_prefix
from hybridkv.store.snapshot import write_snapshot
from hybridkv.tools.common import progress

pytestmark = pytest.mark.fast

T0 = 1_700_000_000  # mtimes are set from here, one second per chunk written


def layout(model="tiny"):
    return HybridLayout(model=model, dtype="bfloat16", groups=(
        GroupSpec(index=0, kind=GroupKind.FULL, block_tokens=16, chunk_tokens=32,
                  layer_names=("l0", "l3"), page_bytes=64),
        GroupSpec(index=1, kind=GroupKind.SLIDING, block_tokens=16, chunk_tokens=32,
                  layer_names=("l1", "l2"), page_bytes=64, window_tokens=40),
        GroupSpec(index=2, kind=GroupKind.STATE, block_tokens=16, chunk_tokens=32,
                  layer_names=("m4",), page_bytes=192),
    ))


_SIZES = {0: ((64, 64), 2), 1: ((64, 64), 2), 2: ((192,), 1)}


def write_chains(store, requests=3, depth=4, seed=0):
    """Prefix chains in every group; returns {key: (size, mtime)} of every file."""
    rng = np.random.default_rng(seed)
    written = {}
    tick = T0 + 1000 * seed
    for req in range(requests):
        prev = {0: None, 1: None, 2: None}
        for i in range(depth):
            h = bytes([seed, req, i]) * 6
            for g, (sizes, blocks) in _SIZES.items():
                key = make_key(h, g)
                arrays = [rng.integers(0, 256, (blocks, s), dtype=np.uint8) for s in sizes]
                size = store.write(key, position=32 * (i + 1), block_offset=0, arrays=arrays,
                                   parent=prev[g])
                tick += 1
                os.utime(store.path(key), (tick, tick))
                written[key] = (size, tick)
                prev[g] = key
    return written


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def cache(tmp_path):
    """A cache dir: layout A (36 chunks, one corrupted, one quarantined, a stale and a
    live temp file) and layout B (another model, 9 chunks)."""
    root = tmp_path / "cache"
    a = ChunkStore(root, layout("tiny-a"))
    a.ensure_dirs()
    written = write_chains(a)
    keys = sorted(written, key=lambda k: written[k][1])
    bad = keys[7]
    corrupt(a.path(bad))
    os.utime(a.path(bad), (written[bad][1],) * 2)
    gone = keys[20]
    a.quarantine(gone, "test")
    quarantined = written.pop(gone)
    host = tmp_name_prefix().split(".")[1]
    leaf = a.path(keys[0]).parent
    stale = leaf / f".{host}.{_dead_pid()}.1.{a.path(keys[0]).name}.tmp"
    stale.write_bytes(b"partial")
    live = leaf / f"{tmp_name_prefix()}2.{a.path(keys[1]).name}.tmp"  # this process: alive
    live.write_bytes(b"writing")
    b = ChunkStore(root, layout("tiny-b"))
    b.ensure_dirs()
    other = write_chains(b, requests=1, depth=3, seed=1)
    return {"root": root, "a": a, "b": b, "written": written, "bad": bad, "gone": gone,
            "quarantined": quarantined, "stale": stale, "live": live, "other": other}


def cli(argv, capsys):
    """(exit status, stdout, stderr) of ``hybridkv ARGV``, in process."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def by_fp(report, store):
    return next(x for x in report["layouts"] if x["fingerprint"] == store.fingerprint)


# ------------------------------------------------------------------ inspect
def test_inspect_reports_what_was_written(cache, capsys):
    a, written = cache["a"], cache["written"]
    rc, out, err = cli(["inspect", "--cache-dir", cache["root"], "--budget", "20KiB", "--json"],
                       capsys)
    assert rc == 0, err
    report = json.loads(out)
    assert {x["fingerprint"] for x in report["layouts"]} == {a.fingerprint, cache["b"].fingerprint}
    lt = by_fp(report, a)
    assert lt["model"] == "tiny-a"
    for g in lt["groups"]:
        mine = [v for k, v in written.items() if key_group(k) == g["index"]]
        assert g["chunks"] == len(mine)
        assert g["bytes"] == sum(s for s, _ in mine)
        spec = a.layout.group(g["index"])
        assert (g["kind"], g["window_tokens"], g["chunk_bytes"]) == (
            spec.kind.value, spec.window_tokens, spec.chunk_bytes)
    total = sum(s for s, _ in written.values())
    assert lt["chunks"] == len(written) and lt["bytes"] == total
    assert lt["budget"] == 20 * 1024 and lt["budget_used"] == pytest.approx(total / 20480)
    from datetime import datetime, timezone
    first, last = min(t for _, t in written.values()), max(t for _, t in written.values())
    assert lt["oldest_chunk"] == datetime.fromtimestamp(first, timezone.utc).isoformat(
        timespec="seconds")
    assert lt["newest_chunk"] == datetime.fromtimestamp(last, timezone.utc).isoformat(
        timespec="seconds")
    assert lt["quarantine"]["files"] == 1 and lt["quarantine"]["bytes"] == cache["quarantined"][0]
    assert lt["temp_files"] == {"files": 2, "stale": 1, "bytes": len(b"partial") + len(b"writing")}
    assert lt["ranks"][0]["source"] == "scan" and lt["ranks"][0]["snapshot_age_s"] is None
    assert by_fp(report, cache["b"])["chunks"] == len(cache["other"])
    # reading changed nothing
    assert cache["stale"].exists() and cache["live"].exists() and a.path(cache["bad"]).exists()
    rc, text, _ = cli(["inspect", "--cache-dir", cache["root"]], capsys)
    assert rc == 0 and a.fingerprint in text and "1 stale" in text


def test_inspect_uses_a_snapshot_checked_against_the_directory(cache, capsys):
    a, written = cache["a"], dict(cache["written"])
    records = list(a.scan())
    write_snapshot(a, records)
    dropped = next(iter(written))
    a.delete(dropped)
    written.pop(dropped)
    added = write_chains(a, requests=1, depth=1, seed=7)
    written.update(added)
    rc, out, err = cli(["inspect", "--cache-dir", cache["root"], "--fingerprint",
                        a.fingerprint, "--json"], capsys)
    assert rc == 0, err
    lt = json.loads(out)["layouts"]
    assert len(lt) == 1
    assert lt[0]["ranks"][0]["source"] == "snapshot"
    assert lt[0]["ranks"][0]["snapshot_age_s"] is not None
    assert lt[0]["chunks"] == len(written)
    assert lt[0]["bytes"] == sum(s for s, _ in written.values())


# ------------------------------------------------------------------ verify
def test_verify_finds_the_corrupted_file_and_moves_it_only_when_asked(cache, capsys):
    a, bad = cache["a"], cache["bad"]
    stray = a.paths.group_dir(0) / "zz" / "not-a-key.safetensors"
    stray.parent.mkdir()
    stray.write_bytes(b"junk")
    rc, out, err = cli(["verify", "--cache-dir", cache["root"], "--workers", 3, "--json"], capsys)
    assert rc == 1, err
    report = json.loads(out)
    lt = by_fp(report, a)
    assert sorted(b["path"] for b in lt["bad_files"]) == sorted([str(a.path(bad)), str(stray)])
    assert all(not b["quarantined"] for b in lt["bad_files"])
    assert lt["ok"] == len(cache["written"]) - 1
    g = next(x for x in lt["groups"] if x["index"] == key_group(bad))
    assert g["bad"] == 1 + (key_group(bad) == 0)
    assert by_fp(report, cache["b"])["bad"] == 0
    assert a.path(bad).exists() and stray.exists()  # nothing moved without --quarantine

    rc, out, _ = cli(["verify", "--cache-dir", cache["root"], "--quarantine", "--json"], capsys)
    assert rc == 1
    assert all(b["quarantined"] for b in by_fp(json.loads(out), a)["bad_files"])
    assert not a.path(bad).exists() and not stray.exists()
    names = os.listdir(a.paths.quarantine_dir)
    assert len(names) == 3  # the one quarantined before, and these two
    rc, out, _ = cli(["verify", "--cache-dir", cache["root"]], capsys)
    assert rc == 0 and "all files verified" in out


# ------------------------------------------------------------------ gc
def _on_disk(store):
    return {p for p in store.paths.rank_dir().rglob("*.safetensors")}


def test_gc_lru_evicts_oldest_first_and_dry_run_changes_nothing(cache, capsys):
    a, written = cache["a"], cache["written"]
    budget = 12 * 1024
    before = _on_disk(a)
    rc, out, err = cli(["gc", "--cache-dir", cache["root"], "--fingerprint", a.fingerprint,
                        "--budget", budget, "--policy", "lru", "--dry-run", "--json"], capsys)
    assert rc == 0, err
    dry = json.loads(out)["layouts"][0]
    assert _on_disk(a) == before and cache["stale"].exists()
    assert dry["stale_temp_removed"] == 1
    rc, out, err = cli(["gc", "--cache-dir", cache["root"], "--fingerprint", a.fingerprint,
                        "--budget", budget, "--policy", "lru", "--json"], capsys)
    assert rc == 0, err
    real = json.loads(out)["layouts"][0]
    assert (real["chunks_evicted"], real["bytes_evicted"]) == (dry["chunks_evicted"],
                                                               dry["bytes_evicted"])
    remaining = {k: v for k, v in written.items() if a.path(k).exists()}
    assert sum(s for s, _ in remaining.values()) <= budget
    gone = set(written) - set(remaining)
    assert gone and len(gone) == real["chunks_evicted"]
    # LRU: every evicted chunk is older than every kept one
    assert max(written[k][1] for k in gone) < min(t for _, t in remaining.values())
    assert not cache["stale"].exists() and cache["live"].exists()
    assert real["stale_temp_removed"] == 1
    assert len(os.listdir(a.paths.quarantine_dir)) == 1  # not purged unless asked
    assert _on_disk(cache["b"]) == {cache["b"].path(k) for k in cache["other"]}


def test_gc_group_aware_keeps_no_orphans(cache, capsys):
    a, written = cache["a"], cache["written"]
    budget = 14 * 1024
    rc, out, err = cli(["gc", "--cache-dir", cache["root"], "--budget", budget, "--json"], capsys)
    assert rc == 0, err
    lt = by_fp(json.loads(out), a)
    assert lt["policy"] == "group_aware" and lt["chunks_evicted"] > 0
    remaining = [k for k in written if a.path(k).exists()]
    assert sum(written[k][0] for k in remaining) <= budget
    # a full-attention chunk whose parent went can never be hit: the policy removes it too
    for k in remaining:
        if key_group(k) == 0:
            header = a.header_of(a.path(k))
            assert header.parent is None or a.path(bytes.fromhex(header.parent)).exists()


def test_gc_purges_quarantine_and_other_fingerprints_only_when_asked(cache, capsys):
    a, b = cache["a"], cache["b"]
    rc, out, err = cli(["gc", "--cache-dir", cache["root"], "--purge-quarantine", "--json"],
                       capsys)
    assert rc == 0, err
    assert by_fp(json.loads(out), a)["quarantine_purged"] == 1
    assert os.listdir(a.paths.quarantine_dir) == []
    assert b.paths.layout_dir.exists()
    rc, out, err = cli(["gc", "--cache-dir", cache["root"], "--other-fingerprints"], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "--fingerprint" in err
    rc, out, err = cli(["gc", "--cache-dir", cache["root"], "--fingerprint", a.fingerprint,
                        "--other-fingerprints", "--json"], capsys)
    assert rc == 0, err
    removed = json.loads(out)["other_fingerprints_removed"]
    assert [r["fingerprint"] for r in removed] == [b.fingerprint]
    assert removed[0]["files"] >= len(cache["other"])
    assert not b.paths.layout_dir.exists() and a.paths.layout_dir.exists()
    assert len(_on_disk(a)) == len(cache["written"])


# ------------------------------------------------------------------ simulate
@pytest.fixture(scope="module")
def small_trace(tmp_path_factory):
    full = make_trace("multi_turn", scale="quick", seed=3)
    trace = Trace(name="small", block_tokens=full.block_tokens, requests=full.requests[:60])
    path = tmp_path_factory.mktemp("trace") / "small.jsonl"
    save_jsonl(trace, path)
    return path


def test_simulate_matches_the_simulator_and_plots(small_trace, tmp_path, capsys):
    png = tmp_path / "out.png"
    rc, out, err = cli(["simulate", "--trace", small_trace, "--model", "qwen3_next_80b",
                        "--budgets", "10%,50%,2GiB", "--policies", "group_aware,lru",
                        "--plot", png, "--json"], capsys)
    assert rc == 0, err
    report = json.loads(out)
    model = SIM_MODELS["qwen3_next_80b"]
    trace = load_jsonl(small_trace, block_tokens=64)
    ws = working_set_bytes(trace, model)
    assert report["working_set_bytes"] == ws
    cells = {(r["budget"], r["policy"]): r for r in report["results"]}
    assert set(cells) == {(b, p) for b in ("10%", "50%", "2GiB") for p in ("group_aware", "lru")}
    assert cells[("10%", "lru")]["budget_bytes"] == int(ws * 0.10)
    assert cells[("2GiB", "lru")]["budget_bytes"] == 2 * 2**30
    direct = replay(trace, model, "group_aware", int(ws * 0.5))
    assert cells[("50%", "group_aware")]["hit_tokens"] == direct.hit_tokens
    ceiling = report["unbounded"]["token_hit_rate"]
    assert ceiling > 0 and all(c["token_hit_rate"] <= ceiling + 1e-12 for c in cells.values())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_from_an_hf_config(small_trace, tmp_path, capsys):
    cfg = tmp_path / "gpt-oss-20b" / "config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps({
        "model_type": "gpt_oss", "torch_dtype": "bfloat16", "hidden_size": 2880,
        "num_hidden_layers": 24, "num_attention_heads": 64, "num_key_value_heads": 8,
        "head_dim": 64, "sliding_window": 128,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention"
                        for i in range(24)]}))
    rc, out, err = cli(["simulate", "--trace", small_trace, "--hf-config", cfg,
                        "--budgets", "25%", "--policies", "lru"], capsys)
    assert rc == 0, err
    assert "gpt-oss-20b" in out and "25%" in out and "unbounded" in out


def test_simulate_says_when_matplotlib_is_missing(small_trace, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rc, out, err = cli(["simulate", "--trace", small_trace, "--model", "jamba_mini",
                        "--plot", tmp_path / "x.png"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "matplotlib" in err and out == ""


def test_a_bad_layout_file_is_named_and_can_be_left_out(cache, capsys):
    b = cache["b"]
    b.paths.layout_file.write_text('{"format_version": 1, "fingerprint": "x"}')
    rc, out, err = cli(["inspect", "--cache-dir", cache["root"]], capsys)
    assert rc == 2 and err.count("\n") == 1 and str(b.paths.layout_file) in err
    b.paths.layout_file.write_text('{"format_version": 99}')
    rc, out, err = cli(["verify", "--cache-dir", cache["root"]], capsys)
    assert rc == 2 and "newer" in err and str(b.paths.layout_file) in err
    rc, out, err = cli(["inspect", "--cache-dir", cache["root"], "--fingerprint",
                        cache["a"].fingerprint, "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out)["layouts"][0]["chunks"] == len(cache["written"])


# ------------------------------------------------------------------ bad arguments
def _bad_cases(root: Path, tmp: Path, trace: Path):
    (tmp / "empty").mkdir(exist_ok=True)
    (tmp / "afile").write_text("x")
    fp = next(p.name for p in root.iterdir())
    return [
        (["inspect", "--cache-dir", tmp / "nope"], str(tmp / "nope")),
        (["inspect", "--cache-dir", tmp / "afile"], "not a directory"),
        (["inspect", "--cache-dir", tmp / "empty"], "no layout directories"),
        (["inspect", "--cache-dir", root / fp], "is a layout directory"),
        (["inspect", "--cache-dir", root, "--budget", "lots"], "'lots'"),
        (["inspect", "--cache-dir", root, "--fingerprint", "feedface"], "feedface"),
        (["verify", "--cache-dir", root, "--workers", 0], "--workers 0"),
        (["verify", "--cache-dir", root, "--workers", "x"], "'x'"),
        (["verify", "--cache-dir", root, "--integrity-key-file", tmp / "nokey"], "nokey"),
        (["verify", "--cache-dir", root, "--frobnicate"], "--frobnicate"),
        (["verify"], "--cache-dir"),
        (["gc", "--cache-dir", root, "--budget=-5GiB"], "-5GiB"),
        (["gc", "--cache-dir", root, "--budget", "0"], "'0'"),
        (["gc", "--cache-dir", root, "--policy", "fifo"], "fifo"),
        (["simulate", "--generator", "multi_turn"], "--model"),
        (["simulate", "--generator", "chitchat", "--model", "jamba_mini"], "chitchat"),
        (["simulate", "--trace", trace, "--generator", "multi_turn", "--model", "jamba_mini"],
         "not allowed with"),
        (["simulate", "--trace", tmp / "no.jsonl", "--model", "jamba_mini"], "no.jsonl"),
        (["simulate", "--trace", trace, "--model", "llama"], "llama"),
        (["simulate", "--trace", trace, "--hf-config", tmp / "none.json"], "none.json"),
        (["simulate", "--trace", trace, "--model", "jamba_mini", "--budgets", "10%,x"], "'x'"),
        (["simulate", "--trace", trace, "--model", "jamba_mini", "--budgets", "0%"], "'0%'"),
        (["simulate", "--trace", trace, "--model", "jamba_mini", "--policies", "mru"], "mru"),
        (["simulate", "--trace", trace, "--model", "jamba_mini", "--block-tokens", 100], "100"),
        (["simulate", "--trace", trace, "--model", "jamba_mini", "--plot",
          tmp / "nodir" / "p.png"], "nodir"),
        (["simulate", "--generator", "agentic", "--model", "jamba_mini", "--scale", "huge"],
         "huge"),
    ]


def test_bad_arguments_fail_with_one_line_and_status_2(cache, small_trace, tmp_path, capsys):
    for argv, needle in _bad_cases(cache["root"], tmp_path, small_trace):
        rc, out, err = cli(argv, capsys)
        assert rc == 2, (argv, rc, err)
        assert err.count("\n") == 1 and err.endswith("\n"), (argv, err)
        assert needle in err, (argv, err)
        assert "Traceback" not in err and out == "", (argv, out)


def test_bad_argument_through_the_console_script(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hybridkv.cli", "gc", "--cache-dir",
                           str(tmp_path / "missing"), "--dry-run"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"hybridkv gc: error: --cache-dir {tmp_path / 'missing'}: no such directory"]


def test_simulate_a_trace_too_short_to_cache(tmp_path, capsys):
    trace = tmp_path / "short.jsonl"
    trace.write_text('{"timestamp": 0, "input_length": 100, "hash_ids": [1, 2]}\n')
    rc, out, err = cli(["simulate", "--trace", trace, "--model", "gemma3_27b"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "256-token chunk" in err and out == ""


def test_bad_trace_line_is_named(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"timestamp": 0, "input_length": 64, "hash_ids": [1]}\n{"oops": 1}\n')
    rc, _, err = cli(["simulate", "--trace", trace, "--model", "jamba_mini"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "line 2" in err


# ------------------------------------------------------------------ progress
class _TTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _TTY())
    assert list(progress(range(5), total=5, desc="work", enabled=True)) == list(range(5))
    assert "work" in sys.stderr.getvalue()
    monkeypatch.setattr(sys, "stderr", _TTY())
    assert list(progress(range(5), total=5, desc="work", enabled=False)) == list(range(5))
    assert sys.stderr.getvalue() == ""
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    assert list(progress(range(5), total=5, desc="work", enabled=True)) == list(range(5))
    assert sys.stderr.getvalue() == ""


def test_tools_import_no_vllm():
    code = ("import sys, hybridkv.cli, hybridkv.tools.inspect, hybridkv.tools.verify, "
            "hybridkv.tools.gc, hybridkv.tools.simulate, hybridkv.sim.hf_layout; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('vllm', 'torch')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_verify_with_the_integrity_key_rejects_an_untagged_file(tmp_path, capsys):
    key_file = tmp_path / "kv.key"
    key_file.write_bytes(os.urandom(32))
    key_file.chmod(0o600)
    root = tmp_path / "cache"
    keyed = ChunkStore(root, layout(), integrity_key=key_file.read_bytes())
    keyed.ensure_dirs()
    written = write_chains(keyed, requests=1, depth=2)
    forged = sorted(written)[0]
    os.unlink(keyed.path(forged))  # replaced by a file with a valid xxh3 but no tag
    plain = ChunkStore(root, layout())
    rng = np.random.default_rng(9)
    sizes, blocks = _SIZES[key_group(forged)]
    plain.write(forged, position=32, block_offset=0,
                arrays=[rng.integers(0, 256, (blocks, s), dtype=np.uint8) for s in sizes])
    rc, out, _ = cli(["verify", "--cache-dir", root, "--json"], capsys)
    assert rc == 0 and json.loads(out)["bad"] == 0  # without the key: checksums only
    rc, out, err = cli(["verify", "--cache-dir", root, "--integrity-key-file", key_file,
                        "--json"], capsys)
    assert rc == 1, err
    report = json.loads(out)
    assert report["ok"] == len(written) - 1
    assert [b["path"] for b in report["layouts"][0]["bad_files"]] == [str(keyed.path(forged))]
    key_file.chmod(0o644)
    rc, _, err = cli(["verify", "--cache-dir", root, "--integrity-key-file", key_file], capsys)
    assert rc == 2 and err.count("\n") == 1 and str(key_file) in err


def test_inspect_shows_the_free_space_and_the_floor(cache, capsys):
    rc, out, err = cli(["inspect", "--cache-dir", cache["root"], "--json",
                        "--min-free-space", "10%"], capsys)
    assert rc == 0, err
    fs = json.loads(out)["filesystem"]
    st = os.statvfs(cache["root"])
    assert fs["total_bytes"] == st.f_blocks * st.f_frsize
    assert fs["min_free_bytes"] == int(fs["total_bytes"] * 0.10)
    assert abs(fs["free_bytes"] - st.f_bavail * st.f_frsize) < 64 * 2**20  # moments apart
    rc, text, _ = cli(["inspect", "--cache-dir", cache["root"]], capsys)
    assert rc == 0 and "free of" in text and "floor (min_free_space, default)" in text
    rc, _, err = cli(["inspect", "--cache-dir", cache["root"], "--min-free-space", "5x"],
                     capsys)
    assert rc == 2 and "--min-free-space" in err and "'5x'" in err and err.count("\n") == 1


def test_stats_prints_store_failures_by_cause(tmp_path, capsys):
    stats_dir = tmp_path / "abcd" / "stats"
    stats_dir.mkdir(parents=True)
    (stats_dir / "worker0-h-1.json").write_text(json.dumps(
        {"all": {"store_failures": 4, "store_failures_no_space": 3,
                 "store_failures_read_only": 1}}))
    (stats_dir / "manager-h-1.json").write_text(json.dumps(
        {"all": {"stores_skipped_disk_full": 7}}))
    rc, out, _ = cli(["stats", "--cache-dir", str(tmp_path)], capsys)
    assert rc == 0
    assert ("store failures: no space 3, permission 0, read-only 1, other 0; stores skipped "
            "for free space: 0 (floor), 7 (backing off a full disk)") in out
    # one line about the disk: the failures were for lack of space (past, or the disk is
    # below its floor now)
    assert "3 stores failed for lack of space" in out or "below the free-space floor" in out


def test_the_space_line_names_each_state(tmp_path):
    from hybridkv.tools.disk_report import space_line

    assert space_line(tmp_path, {}, 0) is None  # room, nothing failed or skipped
    skipped = space_line(tmp_path, {"stores_skipped_floor": 5}, 0)
    assert "at the free-space floor" in skipped and "5 stores skipped" in skipped
    below = space_line(tmp_path, {}, "100%")  # no filesystem has all of itself free
    assert "below the free-space floor" in below
    missing = space_line(tmp_path / "nowhere", {})
    assert missing.startswith("cannot read the free space of")
