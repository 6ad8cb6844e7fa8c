"""Shared fixtures: tiny random-weight hybrid models, built once per machine.

Markers exclude each other: a ``fast`` test (``make test-fast``) carries none of ``engine``,
``slow``, ``gpu``. A test that carries both (say a ``@slow`` test in a module whose
``pytestmark`` is ``fast``) stops collection with an error naming it; pytest's ``-m`` adds
markers up, so mark such modules test by test.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# The tests live in subdirectories that mirror the package (tests/store/, tests/cache/, ...);
# the helper modules they import by name (harness, served, capacity_helpers, pages_helpers,
# scan_group_aware) stay here in tests/. Put this directory on sys.path so `import harness`
# works from every subdirectory, whatever the import mode.
HELPERS = str(Path(__file__).resolve().parent)
if HELPERS not in sys.path:
    sys.path.insert(0, HELPERS)

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


HEAVY = ("engine", "slow", "gpu")


def mixed_markers(items) -> list[str]:
    """Node ids of the items marked ``fast`` and also one of ``HEAVY``."""
    return [item.nodeid for item in items if item.get_closest_marker("fast")
            and any(item.get_closest_marker(name) for name in HEAVY)]


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects: every collected item is checked
def pytest_collection_modifyitems(config, items):
    """Reject ``fast`` mixed with ``engine``/``slow``/``gpu``; skip ``gpu`` tests without CUDA."""
    mixed = mixed_markers(items)
    if mixed:
        raise pytest.UsageError(
            f"marked fast and also {'/'.join(HEAVY)} (markers exclude: mark each test "
            f"of such a module on its own): {', '.join(mixed)}")
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model():
    from hybridkv.demo.models import build_tiny_model, default_model_dir

    def build(kind: str):
        return build_tiny_model(kind, default_model_dir(kind))

    return build
