"""Shared fixtures: tiny random-weight hybrid models, built once per machine."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def tiny_model():
    from hybridkv.models import build_tiny_model, default_model_dir

    def build(kind: str):
        return build_tiny_model(kind, default_model_dir(kind))

    return build
