"""A `hybridkv serve` process for HTTP-level engine tests (metrics, KV events, routing).

Ports: the OS assigns them and the server reports them, except vLLM's HTTP port.
- KV events: ``kv_events_args()`` binds vLLM's publisher to ``tcp://*:0``: vLLM binds
  ``VLLM_HOST_IP`` (127.0.0.1 here) on a free port and reports the bound endpoint at
  ``GET /kv_event_sources`` (``Server.kv_events()``).
- HTTP: vLLM accepts ``--port 0`` but never reports the port it got: it binds the socket
  itself, logs the requested port ("Starting vLLM server on http://127.0.0.1:0") and hands
  the socket to uvicorn, which logs "Uvicorn running on" only for sockets it binds. So the
  port is picked by bind-close-reuse (``free_port``, here only), and a server that lost
  it to another process (EADDRINUSE: vLLM binds before it loads anything) is started again
  on another.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

#: token ids no test prompt uses (prompts draw from 4..499; the tiny vocabulary ends at 512)
PROBE_TOKENS = range(500, 512)


def kv_events_args(*, replay: bool = False) -> tuple[str, ...]:
    """``--kv-events-config`` of a ZMQ publisher on an OS-assigned port (and its replay
    ROUTER on another, with ``replay``)."""
    cfg = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://*:0"}
    if replay:
        cfg["replay_endpoint"] = "tcp://*:0"
    return ("--kv-events-config", json.dumps(cfg))


def free_port() -> int:
    """A port free a moment ago (bind-close-reuse): only for vLLM's HTTP server (see above)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A port the OS assigned, kept bound and not listening until the block ends: a
    connection to it is refused, and no other process can listen there meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


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

    def kv_events(self) -> dict:
        """The engine's KV-event publisher as it bound: ``endpoint`` (``tcp://127.0.0.1:PORT``)
        and ``replay_endpoint`` (None without replay)."""
        sources = json.loads(self.get("/kv_event_sources"))
        assert list(sources) == ["0"], sources  # one engine: data-parallel rank 0
        return sources["0"]

    def wait_subscribed(self, received: Callable[[], bool], block_tokens: int,
                        timeout: float = 120) -> int:
        """Readiness handshake of a subscriber to this engine's KV events; returns the probes
        sent. A PUB socket drops what it sends before a SUB's subscription reaches it, and an
        idle engine publishes nothing: send probe prompts (``block_tokens + 1`` ids of
        ``PROBE_TOKENS``: a whole block stored, new each time, no prefix of a test prompt)
        until ``received()`` says a batch arrived. From then on the subscription is in place."""
        deadline = time.monotonic() + timeout
        probes = 0
        while not received():
            assert time.monotonic() < deadline, f"no KV-event batch arrived after {probes} probes"
            rng = random.Random(f"probe {probes}")
            self.complete([rng.choice(PROBE_TOKENS) for _ in range(block_tokens + 1)])
            probes += 1
            end = time.monotonic() + 5
            while not received() and time.monotonic() < end:
                time.sleep(0.05)
        return probes


@contextlib.contextmanager
def serve(tmp_path: Path, model: str, *args: str, env: dict | None = None,
          start_timeout: float = 600, tries: int = 3) -> Iterator[Server]:
    """Run `hybridkv serve MODEL --cache-dir ... --port PORT ARGS` until the block ends; up
    once ``/v1/models`` answers. A start that lost its port (EADDRINUSE) is retried on
    another free port, ``tries`` starts in all."""
    cache = tmp_path / "cache"
    log_path = tmp_path / "serve.log"
    deadline = time.time() + start_timeout
    for attempt in range(1, tries + 1):
        port = free_port()
        log = open(log_path, "w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "hybridkv.cli", "serve", model, "--cache-dir", str(cache),
             "--port", str(port), *args],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "VLLM_HOST_IP": "127.0.0.1", **(env or {})})
        server = Server(f"http://127.0.0.1:{port}", model, cache, log_path)
        try:
            while proc.poll() is None:
                try:
                    urllib.request.urlopen(server.url + "/v1/models", timeout=2)
                    break
                except OSError:
                    assert time.time() < deadline, "not up: " + log_path.read_text()[-4000:]
                    time.sleep(1)
            else:
                text = log_path.read_text()
                assert "Address already in use" in text and attempt < tries, text[-4000:]
                continue  # another process took the port between free_port() and the bind
            yield server
            return
        finally:
            _stop(proc)
            log.close()


def _stop(proc: subprocess.Popen) -> None:
    """End the server's whole process group (vLLM's engine core included)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
