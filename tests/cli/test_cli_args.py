"""serve / demo / stats check their arguments before any engine starts: one line, exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.fast


def _run(*argv: str):
    return subprocess.run([sys.executable, "-m", "hybridkv.cli", *argv],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv, names", [
    (["serve", "--cache-dir", "/proc/hybridkv-forbidden"], "/proc/hybridkv-forbidden"),
    (["serve", "no-such-model", "--cache-dir", "{tmp}"], "no-such-model"),
    (["serve", "./no/such/dir", "--cache-dir", "{tmp}"], "./no/such/dir"),
    (["serve", "{tmp}", "--cache-dir", "{tmp}/c"], "no config.json"),
    (["serve", "--cache-dir", "{tmp}", "--port", "70000"], "70000"),
    (["serve", "--cache-dir", "{tmp}", "--disk-budget", "12XB"], "12XB"),
    (["demo", "--model", "no-such-model"], "no-such-model"),
    (["demo", "--cache-dir", "{tmp}", "--disk-budget", "-1"], "disk_budget"),
    (["demo", "--json", "/no/such/dir/report.json"], "/no/such/dir"),
    (["stats", "--cache-dir", "/no/such/dir"], "/no/such/dir"),
])
def test_bad_argument_is_one_line_before_any_engine(tmp_path, argv, names):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    proc = _run(*argv)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"hybridkv {argv[0]}: error: ")
    assert names.replace("{tmp}", str(tmp_path)) in lines[0]
    assert "Traceback" not in proc.stderr and "vllm" not in proc.stderr.lower()
