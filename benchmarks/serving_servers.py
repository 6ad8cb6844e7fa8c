"""The servers ``serving.py`` starts: vLLM without offload, ``hybridkv serve``, a router.

Every server gets the same engine flags (those ``hybridkv serve`` passes for a tiny model,
``--num-gpu-blocks-override``, ``--enable-prompt-tokens-details``) and the same core binding
(``VLLM_CPU_NUM_OF_RESERVED_CPU=1``); only the kv_transfer_config differs. A ``Fleet`` ends
every process it started (process groups) when its block ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def disk_tokens(cache_dirs) -> int:
    """hybridkv's ``tokens_from_disk``, summed over every layout under ``cache_dirs`` (a
    directory or a list of them)."""
    from hybridkv.stats import read_stats

    if not cache_dirs:
        return 0
    dirs = cache_dirs if isinstance(cache_dirs, (list, tuple)) else [cache_dirs]
    return sum(read_stats(d).get("all", {}).get("tokens_from_disk", 0)
               for c in dirs for d in Path(c).glob("*/stats"))


def _get(url: str, timeout: float = 5) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


class Fleet:
    def __init__(self, work: Path, kind: str, blocks: int, max_model_len: int,
                 start_timeout: float = 900):
        self.work, self.kind, self.blocks, self.max_model_len = work, kind, blocks, max_model_len
        self.start_timeout = start_timeout
        self.procs: list[subprocess.Popen] = []
        self._model: str | None = None

    @property
    def model(self) -> str:
        if self._model is None:
            from hybridkv.demo.models import build_tiny_model, default_model_dir

            self._model = str(build_tiny_model(self.kind, default_model_dir(self.kind)))
        return self._model

    def cache_dir(self, name: str) -> Path:
        return self.work / f"cache-{name}"

    def engine_args(self) -> list[str]:
        from hybridkv.demo.models import VLLM_ENGINE_KWARGS

        tiny = VLLM_ENGINE_KWARGS[self.kind]
        return ["--enable-prefix-caching", "--enforce-eager", "--dtype", tiny["dtype"],
                "--block-size", str(tiny["block_size"]),
                "--max-model-len", str(self.max_model_len),
                "--num-gpu-blocks-override", str(self.blocks),
                "--enable-prompt-tokens-details", "--max-num-seqs", "16"]

    def _popen(self, name: str, cmd: list[str]) -> subprocess.Popen:
        env = {**os.environ, "VLLM_CPU_NUM_OF_RESERVED_CPU": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
               "VLLM_HOST_IP": "127.0.0.1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                          os.environ.get("PYTHONPATH")]))}
        log = open(self.work / f"{name}.log", "a")  # a restart appends
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                start_new_session=True)
        proc.name, proc.logfile = name, log  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def start_engine(self, name: str, *, offload: bool, extra: list[str] = (),
                     cache_dir: Path | None = None, port: int | None = None) -> tuple:
        """Start one server (``cache_dir``: default ``cache-<name>``); ``(proc, url)``."""
        port = port or free_port()
        if offload:
            cmd = [sys.executable, "-m", "hybridkv.cli", "serve", self.model, "--cache-dir",
                   str(cache_dir or self.cache_dir(name)), "--port", str(port)]
        else:
            cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                   self.model, "--host", "127.0.0.1", "--port", str(port)]
        proc = self._popen(name, cmd + self.engine_args() + list(extra))
        return proc, f"http://127.0.0.1:{port}"

    def wait_up(self, started: dict) -> None:
        """Until every ``name -> (proc, url)`` answers ``/v1/models``; RuntimeError if one dies."""
        deadline = time.monotonic() + self.start_timeout
        waiting = dict(started)
        while waiting:
            for name, (proc, url) in list(waiting.items()):
                if proc.poll() is not None:
                    raise RuntimeError(f"server {name} exited {proc.returncode}: "
                                       f"{(self.work / f'{name}.log').read_text()[-3000:]}")
                with contextlib.suppress(OSError):
                    _get(url + "/v1/models", timeout=2)
                    del waiting[name]
            if time.monotonic() > deadline:
                raise RuntimeError(f"servers {sorted(waiting)} not up in {self.start_timeout} s")
            time.sleep(1)

    def start_pair(self) -> dict[str, str]:
        """vLLM without offload ("off") and ``hybridkv serve`` ("on"), started together."""
        started = {"off": self.start_engine("off", offload=False),
                   "on": self.start_engine("on", offload=True)}
        print(f"starting servers off and on ({self.kind}, {self.blocks} GPU blocks) ...",
              flush=True)
        self.wait_up(started)
        return {name: url for name, (_, url) in started.items()}

    def start_routed(self):
        """Two ``hybridkv serve`` replicas with KV events and ``hybridkv route`` over them:
        ``({name: url}, pick)`` where ``pick(req)`` asks the router."""
        events = ["--kv-events-config", json.dumps({"enable_kv_cache_events": True,
                                                    "publisher": "zmq",
                                                    "endpoint": "tcp://*:0"})]
        started = {n: self.start_engine(n, offload=True, extra=events) for n in ("a", "b")}
        print("starting replicas a and b, then the router ...", flush=True)
        self.wait_up(started)
        urls = {n: url for n, (_, url) in started.items()}
        cmd = [sys.executable, "-m", "hybridkv.cli", "route", "--listen", "127.0.0.1:0",
               "--layout", str(self.cache_dir("a"))]
        for n, url in urls.items():
            endpoint = json.loads(_get(url + "/kv_event_sources"))["0"]["endpoint"]
            cmd += ["--engine", f"{n}={endpoint}"]
        proc = self._popen("router", cmd)
        router = self._router_url(proc)
        return urls, _router_pick(router, urls)

    def _router_url(self, proc) -> str:
        log = self.work / "router.log"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            m = re.search(r"hybridkv route: (http://\S+)", log.read_text())
            if m:
                return m[1]
            if proc.poll() is not None:
                raise RuntimeError(f"router exited {proc.returncode}: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        raise RuntimeError("router not up in 120 s")

    def model_name_of(self, url: str) -> str:
        return json.loads(_get(url + "/v1/models"))["data"][0]["id"]

    def kill(self, proc) -> None:
        """SIGKILL a server's whole process group (its engine core too)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.logfile.close()
        self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            proc.logfile.close()
        self.procs = []

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()


def _router_pick(router: str, urls: dict[str, str]):
    """``pick(req)`` asking ``router`` (POST /route) off the event loop's thread."""
    import asyncio

    def ask(ids: list[int]) -> str:
        req = urllib.request.Request(router + "/route", data=json.dumps({"token_ids": ids}).encode(),
                                     method="POST", headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())["pick"]

    async def pick(req):
        name = await asyncio.to_thread(ask, req.prompt)
        return name, urls[name]

    return pick
