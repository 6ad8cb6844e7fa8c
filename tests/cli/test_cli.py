"""The main job: `hybridkv serve` answers OpenAI requests and stores chunks; `hybridkv demo` reports."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from served import serve

pytestmark = pytest.mark.engine


def test_serve_answers_and_offloads(tmp_path, tiny_model):
    model = str(tiny_model("gemma3"))
    with serve(tmp_path, model, start_timeout=240) as server:
        prompt = "the quick brown fox jumps over the lazy dog " * 20
        first = server.post("/v1/completions", {"model": model, "prompt": prompt,
                                                "max_tokens": 4, "temperature": 0})
        assert first["usage"]["prompt_tokens"] > 256
        deadline = time.time() + 30
        while not list(server.cache.rglob("*.safetensors")):
            assert time.time() < deadline, "no chunk was stored"
            time.sleep(0.5)
        again = server.post("/v1/completions", {"model": model, "prompt": prompt,
                                                "max_tokens": 4, "temperature": 0})
        assert again["choices"][0]["text"] == first["choices"][0]["text"]


def test_demo_serves_second_lifetime_from_disk(tmp_path, tiny_model):
    tiny_model("gemma3")
    report = tmp_path / "demo.json"
    proc = subprocess.run([sys.executable, "-m", "hybridkv.cli", "demo", "--cache-dir",
                           str(tmp_path / "cache"), "--json", str(report)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tokens served from disk in engine B" in proc.stdout
    doc = json.loads(report.read_text())
    assert doc["stats_B"]["all"]["tokens_from_disk"] > 0
    assert [r["output"] for r in doc["A"]["requests"]] == [r["output"] for r in doc["B"]["requests"]]
