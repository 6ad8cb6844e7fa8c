"""The router's HTTP JSON API (stdlib ``http.server``, one thread per request).

- ``POST /route`` ``{"token_ids": [...]}`` or ``{"block_hashes": [...], "num_tokens": N}``
  (hashes as ints or hex strings), optional ``"loads": {replica: number}`` and
  ``"record": false`` -> ``{"pick", "predicted_tokens", "num_tokens",
  "replicas": [{"replica", "tiers": {tier: tokens}, "total", "load", "note"}]}``
- ``GET /replicas`` -> each replica's stream status (connected, last seq, entries,
  resets by reason, mismatch); ``GET /health`` -> ``{"ok": true}``.
A bad body is a 400 with ``{"error": "..."}`` naming the bad value.
"""

from __future__ import annotations

from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import msgspec

from hybridkv.routing.router import Router

__all__ = ["make_server", "MAX_BODY"]

MAX_BODY = 64 << 20


class _RouteBody(msgspec.Struct, forbid_unknown_fields=True):
    token_ids: list[int] | None = None
    block_hashes: list[int | str] | None = None
    num_tokens: int | None = None
    loads: dict[str, float] | None = None
    record: bool = True


def _hash(h: int | str) -> int | bytes:
    if isinstance(h, int):
        return h
    try:
        return bytes.fromhex(h)
    except ValueError:
        raise ValueError(f"block hash {h[:40]!r} is neither an int nor hex") from None


def make_server(router: Router, host: str, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, obj) -> None:
            body = msgspec.json.encode(obj)
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/health":
                self._send(200, {"ok": True})
            elif self.path == "/replicas":
                self._send(200, [router.index.status(n) for n in router.index.replicas])
            else:
                self._send(404, {"error": f"no such path {self.path!r}"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/route":
                self._send(404, {"error": f"no such path {self.path!r}"})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if not 0 < length <= MAX_BODY:
                    raise ValueError(f"Content-Length {length} is not in 1..{MAX_BODY}")
                body = msgspec.json.decode(self.rfile.read(length), type=_RouteBody)
                if body.token_ids is not None and any(t < 0 for t in body.token_ids):
                    raise ValueError("token_ids must be non-negative")
                hashes = None if body.block_hashes is None else [_hash(h) for h in body.block_hashes]
                answer = router.route(body.token_ids, block_hashes=hashes,
                                      num_tokens=body.num_tokens, loads=body.loads,
                                      record=body.record)
            except msgspec.ValidationError as exc:
                self._send(400, {"error": f"bad request body: {exc}"})
                return
            except msgspec.DecodeError as exc:
                self._send(400, {"error": f"request body is not JSON: {exc}"})
                return
            except ValueError as exc:
                self._send(400, {"error": str(exc)})
                return
            self._send(200, answer)

        def log_message(self, fmt, *args) -> None:  # quiet: one line per request is noise
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server

