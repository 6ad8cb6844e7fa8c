"""scripts/device_check.sh (what runs on the GPU machine) dry-runs here: the gpu tests
skip, gpu_transfer.py --quick runs on CPU, every log and JSON lands in $OUT, and the
script says it saw no CUDA (exit 1) instead of reporting success."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_device_check_dry_run_on_cpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the script for real")
    env = dict(os.environ, OUT=str(tmp_path), PY=sys.executable, BENCH_ARGS="--quick")
    proc = subprocess.run(["bash", "scripts/device_check.sh"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    summary = (tmp_path / "summary.txt").read_text()
    assert "NO CUDA" in summary and "pytest rc=0" in summary, summary
    assert "gpu_transfer rc=0" in summary and "device_check status=1" in summary, summary
    assert "skipped" in (tmp_path / "pytest_gpu.log").read_text()
    doc = json.loads((tmp_path / "gpu_transfer.json").read_text())
    assert doc["device"] == "cpu" and doc["quick"]
    assert all(r["bit_exact"] for r in doc["results"]) and len(doc["results"]) == 3
    assert doc["targets"]["cpu_bit_exact"]["met"]
    for name, t in doc["targets"].items():
        assert {"figure", "goal", "met"} <= set(t)
        assert f"target {name}: " in out
