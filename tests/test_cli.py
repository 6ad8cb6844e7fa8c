"""The main job: `hybridkv serve` answers OpenAI requests and stores chunks; `hybridkv demo` reports."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.engine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def test_serve_answers_and_offloads(tmp_path, tiny_model):
    model = str(tiny_model("gemma3"))
    port = _free_port()
    cache = tmp_path / "cache"
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "hybridkv.cli", "serve", model,
                             "--cache-dir", str(cache), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "server did not come up"
                time.sleep(2)
        prompt = "the quick brown fox jumps over the lazy dog " * 20
        body = {"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0}
        first = _post(f"http://127.0.0.1:{port}/v1/completions", body)
        assert first["usage"]["prompt_tokens"] > 256
        deadline = time.time() + 30
        while not list(cache.rglob("*.safetensors")):
            assert time.time() < deadline, "no chunk was stored"
            time.sleep(0.5)
        again = _post(f"http://127.0.0.1:{port}/v1/completions", body)
        assert again["choices"][0]["text"] == first["choices"][0]["text"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


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
