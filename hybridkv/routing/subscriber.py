"""ZMQ SUB side: receive vLLM KV-event batches from many engines and feed a ``PrefixIndex``.

One SUB socket per engine (``connect`` to the engine's ``--kv-events-config``
endpoint, e.g. ``tcp://10.0.0.5:5557``), all polled by one thread, plus a
socket monitor per engine: a dropped connection (an engine restart drops it)
empties that engine's view (``PrefixIndex.set_connected``) after the batches
that arrived before the drop are applied. Messages are
``(topic, seq, payload)``; anything else is counted undecodable and treated
as a lost batch (the view is emptied). Replay (vLLM's ROUTER endpoint) is not
used: after a loss the view refills from new events.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Mapping

import zmq
from zmq.utils.monitor import recv_monitor_message

from hybridkv.routing.events import EventDecodeError, decode_batch, decode_seq
from hybridkv.routing.index import PrefixIndex

__all__ = ["EventSubscriber", "check_endpoint", "EndpointError"]

_TCP = re.compile(r"^tcp://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


class EndpointError(ValueError):
    """An engine endpoint the router cannot connect to (bad form or unreachable)."""


def check_endpoint(endpoint: str) -> str:
    """Validate a connectable ZMQ endpoint (``tcp://HOST:PORT``, ``ipc://PATH``, ``inproc://N``)."""
    if endpoint.startswith(("ipc://", "inproc://")):
        if endpoint.split("://", 1)[1]:
            return endpoint
        raise EndpointError(f"{endpoint!r}: missing path")
    m = _TCP.match(endpoint)
    if m is None:
        hint = " (a router connects: give the engine's host, not '*')" if "*" in endpoint else ""
        raise EndpointError(f"{endpoint!r} is not tcp://HOST:PORT, ipc://PATH or inproc://NAME{hint}")
    if not 0 < int(m.group(2)) < 65536:
        raise EndpointError(f"{endpoint!r}: port {m.group(2)} is out of range")
    return endpoint


class EventSubscriber:
    """Background thread: engines' events -> ``index``. ``close()`` stops it."""

    def __init__(self, index: PrefixIndex, endpoints: Mapping[str, str], *, topic: str = "",
                 context: zmq.Context | None = None) -> None:
        self.index = index
        self.endpoints = {name: check_endpoint(ep) for name, ep in endpoints.items()}
        self._ctx = context or zmq.Context.instance()
        self._subs: dict[zmq.Socket, str] = {}
        self._monitors: dict[zmq.Socket, str] = {}
        self._connected_once: set[str] = set()
        self._cv = threading.Condition()
        for name, ep in self.endpoints.items():
            index.add_replica(name)
            sub = self._ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt_string(zmq.SUBSCRIBE, topic)
            mon = sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
            try:
                sub.connect(ep)
            except zmq.ZMQError as exc:
                self._close_sockets()
                raise EndpointError(f"{name}={ep}: {exc}") from None
            self._subs[sub] = name
            self._monitors[mon] = name
        self._running = True
        self._thread = threading.Thread(target=self._run, name="hybridkv-route-sub", daemon=True)
        self._thread.start()

    def wait_connected(self, timeout_s: float) -> list[str]:
        """Wait until every engine connected once; return the names that did not."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while True:
                missing = [n for n in self.endpoints if n not in self._connected_once]
                left = deadline - time.monotonic()
                if not missing or left <= 0:
                    return missing
                self._cv.wait(left)

    def _run(self) -> None:
        poller = zmq.Poller()
        for s in (*self._subs, *self._monitors):
            poller.register(s, zmq.POLLIN)
        while self._running:
            try:
                ready = dict(poller.poll(100))
            except zmq.ZMQError:
                break
            for sock in ready:
                if sock in self._monitors:
                    self._on_monitor(sock)
                else:
                    self._on_message(sock)

    def _on_monitor(self, mon: zmq.Socket) -> None:
        name = self._monitors[mon]
        msg = recv_monitor_message(mon)
        connected = msg["event"] == zmq.EVENT_CONNECTED
        if not connected:
            # batches that arrived before the drop are older than the reset: apply them first
            sub = next(s for s, n in self._subs.items() if n == name)
            while sub.poll(0):
                self._on_message(sub)
        self.index.set_connected(name, connected)
        if connected:
            with self._cv:
                self._connected_once.add(name)
                self._cv.notify_all()

    def _on_message(self, sub: zmq.Socket) -> None:
        name = self._subs[sub]
        frames = sub.recv_multipart()
        try:
            if len(frames) != 3:
                raise EventDecodeError(f"{len(frames)} frames, expected 3")
            _, seq_frame, payload = frames
            seq = decode_seq(seq_frame)
            batch = decode_batch(payload)
        except EventDecodeError:
            self.index.note_undecodable(name)
            return
        self.index.apply(name, seq, batch)

    def _close_sockets(self) -> None:
        for s in (*self._subs, *self._monitors):
            s.close(linger=0)

    def close(self) -> None:
        self._running = False
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        for sub in self._subs:
            try:
                sub.disable_monitor()
            except zmq.ZMQError:
                pass
        self._close_sockets()
