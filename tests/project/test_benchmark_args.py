"""The engine benchmarks refuse bad arguments in one line, before any engine starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast

REPO = Path(__file__).resolve().parents[2]

CASES = [
    (["benchmarks/ttft.py", "--models", "llama"], "'llama'"),
    (["benchmarks/ttft.py", "--lengths", "1024,x"], "'1024,x'"),
    (["benchmarks/ttft.py", "--lengths", "512"], "512"),
    (["benchmarks/ttft.py", "--models", "gemma3", "--lengths", "8192"], "8192"),
    (["benchmarks/ttft.py", "--runs", "0"], "--runs"),
    (["benchmarks/overhead.py", "--model", "llama"], "'llama'"),
    (["benchmarks/overhead.py", "--batch", "0"], "--batch"),
    (["benchmarks/overhead.py", "--model", "gemma3", "--prompt-tokens", "9000"], "9000"),
    (["benchmarks/tier_io.py", "--sizes", "64,x"], "'64,x'"),
    (["benchmarks/tier_io.py", "--sizes", "100"], "'100'"),
    (["benchmarks/tier_io.py", "--threads", "0"], "--threads"),
    (["benchmarks/tier_io.py", "--rounds", "x"], "--rounds"),
    (["benchmarks/tier_io.py", "--bogus"], "--bogus"),
    (["benchmarks/hit_cost.py", "--lengths", "100"], "100"),
    (["benchmarks/hit_cost.py", "--lengths", "1024,x"], "'1024,x'"),
    (["benchmarks/hit_cost.py", "--pairs", "0"], "--pairs"),
    (["benchmarks/soak.py", "--budget", "12XB"], "12XB"),
    (["benchmarks/soak.py", "--waves", "0"], "--waves"),
    (["benchmarks/serving.py", "--model", "llama"], "'llama'"),
    (["benchmarks/serving.py", "--rates", "1,x"], "'1,x'"),
    (["benchmarks/serving.py", "--rates", "0"], "'0'"),
    (["benchmarks/serving.py", "--workloads", "chat"], "'chat'"),
    (["benchmarks/serving.py", "--blocks", "0"], "--blocks"),
    (["benchmarks/serving.py", "--off-url", "http://x:1"], "--on-url"),
    (["benchmarks/serving.py", "--plot", "/nonexistent/p.png"], "/nonexistent"),
]


@pytest.mark.parametrize("args,named", CASES, ids=[" ".join(a[1:]) for a, _ in CASES])
def test_bad_argument_is_one_line_naming_it(args, named, tmp_path):
    out = tmp_path / "x.json"
    proc = subprocess.run([sys.executable, *args, "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


@pytest.mark.parametrize("script", ["benchmarks/overhead.py", "benchmarks/tier_io.py"])
def test_missing_output_directory_is_refused(script, tmp_path):
    out = tmp_path / "nope" / "x.json"
    proc = subprocess.run([sys.executable, script, "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and str(out.parent) in proc.stderr.strip()
