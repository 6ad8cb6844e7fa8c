"""Shared fixtures: tiny random-weight hybrid models, built once per machine."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests need CUDA: skip them where torch sees no GPU."""
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
