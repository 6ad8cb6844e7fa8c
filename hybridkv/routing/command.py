"""``hybridkv route``: subscribe to engines' KV events and serve the router's HTTP API.

Every argument is checked before any socket opens; a bad one, an engine that
does not connect within ``--connect-timeout`` or a port that cannot be bound
ends the command with ONE line naming the value (exit 2), never a traceback.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_route_parser", "cmd_route", "RouteArgError"]


class RouteArgError(ValueError):
    pass


def add_route_parser(sub) -> argparse.ArgumentParser:
    r = sub.add_parser("route", help="hybrid-aware KV router: engines' KV events -> HTTP JSON "
                                     "API (see docs/routing.md)")
    r.add_argument("--listen", required=True,
                   help="HOST:PORT for the HTTP API (port 0: the OS picks one; the line "
                        "printed once serving, 'hybridkv route: http://HOST:PORT ...', names it)")
    r.add_argument("--engine", action="append", required=True, metavar="NAME=ZMQ_ENDPOINT",
                   help="an engine's KV-event endpoint, e.g. a=tcp://10.0.0.5:5557 (repeat)")
    r.add_argument("--layout", default=None,
                   help="the fleet's hybridkv layout.json, its directory or the cache dir")
    r.add_argument("--groups", default=None,
                   help="instead of --layout: KIND:BLOCK[:WINDOW],... (full, sliding, state)")
    r.add_argument("--blocks-per-chunk", type=int, default=1, help="with --groups")
    r.add_argument("--hash-algo", default="sha256",
                   help="the engines' --prefix-caching-hash-algo (default sha256)")
    r.add_argument("--hash-seed", default=None,
                   help="the engines' PYTHONHASHSEED, if they set one")
    r.add_argument("--hash-block-tokens", type=int, default=None,
                   help="tokens per block hash (default: the smallest block size of the layout)")
    r.add_argument("--max-entries", type=int, default=1_000_000,
                   help="block hashes kept per engine (least recently used go first)")
    r.add_argument("--topic", default="", help="the engines' kv-events topic")
    r.add_argument("--connect-timeout", type=float, default=10.0,
                   help="seconds to wait for every engine's events socket (0: do not wait)")
    r.add_argument("--load-window", type=float, default=10.0,
                   help="seconds of routed requests that count as a replica's load")

    def one_line_error(message: str) -> None:  # argparse prints usage too: one line instead
        print(f"hybridkv route: {message}", file=sys.stderr)
        raise SystemExit(2)

    r.error = one_line_error
    return r


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise RouteArgError(f"--listen {value!r}: expected HOST:PORT with a port in 0..65535 (0: any free port)")
    return host.strip("[]"), int(port)


def _engines(values: list[str]) -> dict[str, str]:
    from hybridkv.routing.subscriber import EndpointError, check_endpoint

    out: dict[str, str] = {}
    for v in values:
        name, sep, ep = v.partition("=")
        if not sep or not name or not ep:
            raise RouteArgError(f"--engine {v!r}: expected NAME=ZMQ_ENDPOINT")
        if name in out:
            raise RouteArgError(f"--engine {v!r}: engine name {name!r} given twice")
        try:
            out[name] = check_endpoint(ep)
        except EndpointError as exc:
            raise RouteArgError(f"--engine {name}: {exc}") from None
    return out


def build_router(args):
    """Check every argument and build the Router (no sockets yet)."""
    from hybridkv.routing.hashing import RequestHasher
    from hybridkv.routing.layout import load_layout, parse_groups
    from hybridkv.routing.router import Router

    listen = _listen(args.listen)
    engines = _engines(args.engine)
    if (args.layout is None) == (args.groups is None):
        raise RouteArgError("give exactly one of --layout and --groups")
    for flag, value in (("--max-entries", args.max_entries),
                        ("--blocks-per-chunk", args.blocks_per_chunk)):
        if value <= 0:
            raise RouteArgError(f"{flag} {value}: must be positive")
    if args.connect_timeout < 0 or args.load_window <= 0:
        raise RouteArgError(f"--connect-timeout {args.connect_timeout} / --load-window "
                            f"{args.load_window}: must be >= 0 / > 0")
    try:
        layout = (load_layout(args.layout) if args.layout is not None
                  else parse_groups(args.groups, args.blocks_per_chunk))
    except ValueError as exc:
        raise RouteArgError(f"{'--layout' if args.layout else '--groups'}: {exc}") from None
    hb = args.hash_block_tokens or min(g.block_tokens for g in layout.groups)
    try:
        hasher = RequestHasher(args.hash_algo, args.hash_seed, hb)
    except ValueError as exc:
        raise RouteArgError(f"--hash-algo/--hash-seed/--hash-block-tokens: {exc}") from None
    bad = [g.index for g in layout.groups if g.block_tokens % hb]
    if bad:
        raise RouteArgError(f"--hash-block-tokens {hb}: does not divide the block size of "
                            f"group(s) {bad}")
    router = Router(layout, list(engines), hasher=hasher, max_entries=args.max_entries,
                    load_window_s=args.load_window)
    return router, engines, listen


def cmd_route(args) -> int:
    from hybridkv.routing.server import make_server
    from hybridkv.routing.subscriber import EndpointError, EventSubscriber

    def fail(msg: str) -> int:
        print(f"hybridkv route: {msg}", file=sys.stderr)
        return 2

    try:
        router, engines, (host, port) = build_router(args)
    except RouteArgError as exc:
        return fail(str(exc))
    try:
        server = make_server(router, host, port)
    except OSError as exc:
        return fail(f"--listen {args.listen}: cannot bind ({exc.strerror or exc})")
    try:
        subscriber = EventSubscriber(router.index, engines, topic=args.topic)
    except EndpointError as exc:
        server.server_close()
        return fail(f"--engine {exc}")
    try:
        if args.connect_timeout > 0:
            missing = subscriber.wait_connected(args.connect_timeout)
            if missing:
                name = missing[0]
                return fail(f"--engine {name}={engines[name]}: unreachable (no connection within "
                            f"{args.connect_timeout:g} s; is the engine up with "
                            "--kv-events-config publishing there?)")
        print(f"hybridkv route: http://{host}:{server.server_address[1]} "
              f"({', '.join(f'{n}={e}' for n, e in engines.items())})", file=sys.stderr, flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        subscriber.close()
        server.server_close()
