"""The router as a service: vLLM's own ZMQ publisher -> subscriber -> HTTP API; the CLI's errors.

Ports are the OS's: publishers bind ``tcp://*:0`` (vLLM reports the endpoint it bound),
the router's HTTP API ``--listen 127.0.0.1:0`` (it prints the URL it bound), and an engine
nothing listens on is a port kept bound without listening (``served.refused_port``).
"""

from __future__ import annotations

import json
import re
import select
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from served import refused_port

from hybridkv.groups import GroupKind, GroupSpec, HybridLayout
from hybridkv.routing.hashing import RequestHasher
from hybridkv.routing.layout import load_layout, parse_groups
from hybridkv.routing.router import Router
from hybridkv.routing.server import make_server
from hybridkv.routing.subscriber import EndpointError, EventSubscriber, check_endpoint

pytestmark = pytest.mark.fast
REPO = Path(__file__).resolve().parents[2]
HB = 16
LAYOUT = HybridLayout(model="t", dtype="x", groups=(
    GroupSpec(index=0, kind=GroupKind.FULL, block_tokens=HB, chunk_tokens=HB, layer_names=("f",),
              page_bytes=1),
    GroupSpec(index=1, kind=GroupKind.SLIDING, block_tokens=HB, chunk_tokens=HB,
              layer_names=("s",), page_bytes=1, window_tokens=32)))
TOKENS = list(range(500, 500 + 6 * HB + 3))


@pytest.fixture
def refused():
    """``tcp://127.0.0.1:PORT`` that refuses connections for the whole test."""
    with refused_port() as port:
        yield f"tcp://127.0.0.1:{port}"


def _until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def _subscribed(kv_events, pub, index, name: str, timeout: float = 10.0) -> None:
    """Readiness handshake: publish empty batches until one more reaches ``index``. A PUB
    drops what it sends before a SUB's subscription reaches it; once a batch arrived, the
    subscription is in place for every later one."""
    seen = index.status(name).batches
    deadline = time.monotonic() + timeout
    while index.status(name).batches == seen:
        assert time.monotonic() < deadline, "no probe batch reached the subscriber"
        pub.publish(kv_events.KVEventBatch(ts=time.time(), events=[]))
        _until(lambda: index.status(name).batches > seen, 0.2)


def _rebind(kv_events, endpoint: str, timeout: float = 10.0):
    """A publisher on the endpoint a closed one had (a restarted engine keeps its endpoint).
    ZMQ closes sockets in its I/O thread: the port may be held a moment, so retry."""
    import zmq

    deadline = time.monotonic() + timeout
    while True:
        try:
            return kv_events.ZmqEventPublisher(0, endpoint=endpoint)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _gpu_batch(kv_events, hashes, groups=(0, 1)):
    return kv_events.KVEventBatch(ts=time.time(), events=[
        kv_events.BlockStored(block_hashes=hashes, parent_block_hash=None, token_ids=[],
                              block_size=HB, lora_id=None, medium="GPU", lora_name=None,
                              group_idx=g) for g in groups])


def test_vllm_publisher_to_router_and_restart_empties_the_view(monkeypatch, refused):
    kv_events = pytest.importorskip("vllm.distributed.kv_events")
    from vllm.v1.core import kv_cache_utils as u

    monkeypatch.setenv("VLLM_HOST_IP", "127.0.0.1")  # where vLLM binds tcp://*:0
    hasher = RequestHasher(block_tokens=HB)
    hashes = [u.maybe_convert_block_hash(h) for h in hasher.hashes(TOKENS)]
    router = Router(LAYOUT, ["a", "b"], hasher=hasher)
    pub = kv_events.ZmqEventPublisher(0, endpoint="tcp://*:0")
    ep = pub.get_publisher_config().endpoint
    assert ep.startswith("tcp://127.0.0.1:") and not ep.endswith(":0"), ep
    sub = EventSubscriber(router.index, {"a": ep, "b": refused})
    try:
        assert sub.wait_connected(10) == ["b"]  # nothing listens for b
        _subscribed(kv_events, pub, router.index, "a")
        pub.publish(_gpu_batch(kv_events, hashes))
        assert _until(lambda: router.route(TOKENS, record=False).predicted_tokens == 6 * HB)
        ans = router.route(TOKENS)
        assert ans.pick == "a" and {s.replica: s.total for s in ans.replicas} == {"a": 96, "b": 0}
        pub.shutdown()
        assert _until(lambda: router.route(TOKENS, record=False).predicted_tokens == 0)
        assert router.index.status("a").resets.get("disconnected") == 1
        pub = _rebind(kv_events, "tcp://*:" + ep.rsplit(":", 1)[1])  # restarted engine
        assert _until(lambda: router.index.status("a").connected)
        _subscribed(kv_events, pub, router.index, "a")
        pub.publish(_gpu_batch(kv_events, hashes[:3]))
        assert _until(lambda: router.route(TOKENS, record=False).predicted_tokens == 48)
    finally:
        pub.shutdown()
        sub.close()


def test_http_api():
    router = Router(LAYOUT, ["a", "b"], hasher=RequestHasher(block_tokens=HB))
    server = make_server(router, "127.0.0.1", 0)
    import threading

    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"

    def post(body: bytes):
        req = urllib.request.Request(base + "/route", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    try:
        from hybridkv.routing.events import BlockStored, KVEventBatch

        keys = router.hasher.keys(TOKENS)
        router.index.apply("b", 0, KVEventBatch(ts=0, events=[BlockStored(
            block_hashes=keys[:4], parent_block_hash=None, token_ids=[], block_size=HB,
            lora_id=None, medium="GPU", lora_name=None, group_idx=g) for g in (0, 1)]))
        code, ans = post(json.dumps({"token_ids": TOKENS}).encode())
        assert code == 200 and ans["pick"] == "b" and ans["predicted_tokens"] == 64
        assert {r["replica"]: r["tiers"]["GPU"] for r in ans["replicas"]} == {"a": 0, "b": 64}
        hexes = [h.hex() for h in router.hasher.hashes(TOKENS)]
        code, ans = post(json.dumps({"block_hashes": hexes, "num_tokens": len(TOKENS)}).encode())
        assert code == 200 and ans["predicted_tokens"] == 64
        for bad, word in ((b"{", "JSON"), (b'{"token_ids": [-1]}', "non-negative"),
                          (b'{"tokens": [1]}', "tokens"), (b'{"block_hashes": ["zz"]}', "zz"),
                          (b"{}", "exactly one")):
            code, ans = post(bad)
            assert code == 400 and word in ans["error"], (bad, ans)
        with urllib.request.urlopen(base + "/replicas", timeout=10) as r:
            status = json.loads(r.read())
        assert [s["name"] for s in status] == ["a", "b"] and status[1]["entries"] == 8
    finally:
        server.shutdown()
        server.server_close()


def test_endpoints_layouts_and_specs(tmp_path):
    assert check_endpoint("tcp://10.0.0.5:5557") and check_endpoint("ipc:///tmp/x")
    for bad in ("tcp://*:5557", "tcp://host", "http://h:1", "tcp://h:70000", "ipc://"):
        with pytest.raises(EndpointError):
            check_endpoint(bad)
    d = tmp_path / "cache" / "abcd"
    d.mkdir(parents=True)
    import msgspec

    (d / "layout.json").write_bytes(msgspec.json.encode({"format_version": 1, "fingerprint": "x",
                                                         "layout": LAYOUT}))
    assert load_layout(tmp_path / "cache") == LAYOUT == load_layout(d / "layout.json")
    with pytest.raises(ValueError, match="found 0"):
        load_layout(tmp_path)
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(ValueError, match="not a hybridkv layout"):
        load_layout(tmp_path / "junk.json")
    lay = parse_groups("full:16,sliding:16:4096,state:16", blocks_per_chunk=2)
    assert [g.kind for g in lay.groups] == [GroupKind.FULL, GroupKind.SLIDING, GroupKind.STATE]
    assert lay.groups[1].window_tokens == 4096 and lay.groups[0].chunk_tokens == 32
    for bad in ("full", "sliding:16", "full:16:3", "mamba:16", "full:x", "full:0"):
        with pytest.raises(ValueError, match="group"):
            parse_groups(bad)


def _route(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "hybridkv.cli", "route", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args,word", [
    (["--engine", "a=tcp://127.0.0.1:1", "--groups", "full:16"], "--listen"),
    (["--listen", "nohost", "--engine", "a=tcp://127.0.0.1:1", "--groups", "full:16"], "nohost"),
    (["--listen", "127.0.0.1:0", "--engine", "a=tcp://*:5557", "--groups", "full:16"], "*"),
    (["--listen", "127.0.0.1:0", "--engine", "a", "--groups", "full:16"], "NAME=ZMQ_ENDPOINT"),
    (["--listen", "127.0.0.1:0", "--engine", "a=tcp://h:1", "--engine", "a=tcp://h:2",
      "--groups", "full:16"], "twice"),
    (["--listen", "127.0.0.1:0", "--engine", "a=tcp://h:1"], "--layout"),
    (["--listen", "127.0.0.1:0", "--engine", "a=tcp://h:1", "--groups", "wide:16"], "wide:16"),
    (["--listen", "127.0.0.1:0", "--engine", "a=tcp://h:1", "--layout", "/nonexistent"],
     "/nonexistent"),
    (["--listen", "127.0.0.1:0", "--engine", "a=tcp://h:1", "--groups", "full:16",
      "--hash-algo", "md5"], "md5"),
    (["--listen", "127.0.0.1:0", "--engine", "a=tcp://h:1", "--groups", "full:16",
      "--max-entries", "0"], "--max-entries"),
    (["--listen", "127.0.0.1:0", "--engine", "a=tcp://h:1", "--groups", "full:16",
      "--hash-block-tokens", "5"], "5"),
    (["--listen", "127.0.0.1:0", "--engine", "a={refused}", "--groups",
      "full:16", "--connect-timeout", "1"], "unreachable"),
])
def test_cli_errors_are_one_line(args, word, refused):
    proc = _route(*(a.replace("{refused}", refused) for a in args))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and word in lines[0] and lines[0].startswith("hybridkv route:"), lines
    assert "Traceback" not in proc.stderr


def test_cli_serves_until_stopped(tmp_path, refused):
    m = None
    proc = subprocess.Popen([sys.executable, "-m", "hybridkv.cli", "route", "--listen",
                             "127.0.0.1:0", "--engine", f"a={refused}",
                             "--groups", "full:16,sliding:16:32", "--connect-timeout", "0"],
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        # the line it prints once serving names the port the OS gave it
        lines = []
        while select.select([proc.stderr], [], [], 60)[0] and (line := proc.stderr.readline()):
            lines.append(line)
            if m := re.match(r"hybridkv route: (http://127\.0\.0\.1:(\d+)) \(a=", line):
                break
        assert m and int(m.group(2)) > 0, lines
        base = m.group(1)
        with urllib.request.urlopen(base + "/health", timeout=10) as r:
            assert json.loads(r.read()) == {"ok": True}
        req = urllib.request.Request(base + "/route", method="POST",
                                     data=json.dumps({"token_ids": TOKENS}).encode())
        with urllib.request.urlopen(req, timeout=10) as r:
            ans = json.loads(r.read())
        assert ans["pick"] == "a" and ans["predicted_tokens"] == 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_routing_core_imports_no_vllm():
    code = ("import sys, hybridkv.routing.command, hybridkv.routing.server, "
            "hybridkv.routing.subscriber, hybridkv.routing.layout, hybridkv.sim.routing; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'vllm'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
