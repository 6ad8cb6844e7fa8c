"""Markers exclude: ``-m fast`` (``make test-fast``) selects no engine, slow or gpu test.

pytest's ``-m`` matches every marker an item inherits, so a ``@slow`` test in a module
marked ``fast`` would run under ``-m fast``; tests/conftest.py rejects such a test at
collection. Checked on the suite itself and on a module made to break the rule.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast
TESTS = Path(__file__).resolve().parents[1]

EXIT_NO_TESTS, EXIT_USAGE = 5, 4


def _pytest(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_suite_has_no_fast_test_that_is_also_engine_slow_or_gpu():
    """Collect the whole suite: no item carries fast together with a heavy marker (the
    conftest check passes and the selection of exactly such items is empty). A module that
    fails to import is its own tests' failure, not this one's."""
    proc = _pytest("--collect-only", "-q", "--continue-on-collection-errors",
                   "-m", "fast and (engine or slow or gpu)", str(TESTS), cwd=TESTS.parent)
    out = proc.stdout + proc.stderr
    assert proc.returncode != EXIT_USAGE and "marked fast and also" not in out, out[-3000:]
    selected = [line for line in proc.stdout.splitlines() if "::" in line]
    assert selected == [] and "deselected" in proc.stdout, out[-3000:]


def test_a_slow_test_in_a_fast_module_stops_collection(tmp_path):
    (tmp_path / "conftest.py").write_text((TESTS / "conftest.py").read_text())
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nmarkers =\n    fast: f\n    engine: e\n    slow: s\n    gpu: g\n")
    (tmp_path / "test_mixed.py").write_text(
        "import pytest\n\npytestmark = pytest.mark.fast\n\n\ndef test_quick():\n    pass\n\n\n"
        "@pytest.mark.slow\ndef test_long():\n    pass\n")
    proc = _pytest("-m", "fast", cwd=tmp_path)
    assert proc.returncode == EXIT_USAGE, proc.stdout + proc.stderr
    assert "test_mixed.py::test_long" in proc.stderr and "test_quick" not in proc.stderr
    assert "passed" not in proc.stdout  # nothing ran

    # marked test by test, the module collects and -m fast runs only the fast one
    (tmp_path / "test_mixed.py").write_text(
        "import pytest\n\n\n@pytest.mark.fast\ndef test_quick():\n    pass\n\n\n"
        "@pytest.mark.slow\ndef test_long():\n    pass\n")
    proc = _pytest("-m", "fast", "-v", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "test_quick PASSED" in proc.stdout and "test_long" not in proc.stdout
