"""A `hybridkv serve` process for HTTP-level engine tests (metrics, KV events)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    model: str
    cache: Path
    log: Path

    def post(self, path: str, body: dict | None = None, timeout: float = 120) -> dict:
        data = json.dumps(body).encode() if body is not None else b""
        req = urllib.request.Request(self.url + path, data=data, method="POST",
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            text = resp.read()
        return json.loads(text) if text.strip() else {}

    def complete(self, prompt: list[int], max_tokens: int = 1) -> dict:
        return self.post("/v1/completions", {"model": self.model, "prompt": prompt,
                                             "max_tokens": max_tokens, "temperature": 0})

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=30) as resp:
            return resp.read().decode()

    def layout(self) -> dict:
        (doc,) = self.cache.glob("*/layout.json")
        return json.loads(doc.read_text())["layout"]


@contextlib.contextmanager
def serve(tmp_path: Path, model: str, *args: str, env: dict | None = None,
          start_timeout: float = 600) -> Iterator[Server]:
    """Run `hybridkv serve MODEL --cache-dir ... ARGS` until the block ends."""
    port = free_port()
    cache = tmp_path / "cache"
    log_path = tmp_path / "serve.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "hybridkv.cli", "serve", model, "--cache-dir", str(cache),
         "--port", str(port), *args],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, **(env or {})})
    server = Server(f"http://127.0.0.1:{port}", model, cache, log_path)
    try:
        deadline = time.time() + start_timeout
        while True:
            assert proc.poll() is None, log_path.read_text()[-4000:]
            try:
                urllib.request.urlopen(server.url + "/v1/models", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "server did not come up"
                time.sleep(2)
        yield server
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
