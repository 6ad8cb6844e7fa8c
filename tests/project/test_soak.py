"""The soak with faults (``benchmarks/soak.py --quick``), bounded: two ``hybridkv serve``
replicas on one small-budget directory under multi-turn load while one is SIGKILLed and
restarted, chunk files get flipped bits and are deleted (and, where a tmpfs can be mounted,
the disk fills): no completed response differs from the server without offload, no request
fails except those in flight on the killed replica, bytes on disk stay within the budget,
and every fault was injected. A few minutes on 2 shared cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.engine]

REPO = Path(__file__).resolve().parents[2]


def test_soak_with_faults_serves_only_correct_tokens(tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, "benchmarks/soak.py", "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    counts = doc["counts"]
    assert counts["requests"] > 0 and counts["completed"] > counts["requests"] // 2, counts
    assert all(n >= 1 for n in counts["faults"].values()), counts["faults"]
    assert {"kill", "bitflip", "delete"} <= set(counts["faults"]), counts["faults"]
    assert counts["wrong_outputs"] == 0, counts
    assert counts["failed_not_killed"] == 0, counts["failure_reasons"]
    assert doc["targets"]["disk_over_budget_bytes"]["figure"] == 0, doc["targets"]
