"""``llamarpc-server --metrics-port P``: the node's own /metrics over HTTP(S), by prometheus-client.

What it serves (README, "Compute nodes"): sessions, buffers and bytes held by kind (weights, KV
cache, other buffers, the compiled programs' scratch arenas), memory capacity and use, Compute
calls and seconds, bytes received and sent, weight-cache hits and misses, calls refused by gRPC
status code, and the process's RSS/CPU/fds. Values are read at scrape time from the node's own
counters (`rpcserver.stats`) and a snapshot of its buffers, never under the lock a Compute holds.

The same rules as the gRPC port: bound to the same host; with a token every request needs
``Authorization: Bearer <token>`` (401 otherwise, compared in constant time); with TLS it is served
over TLS with the node's certificate. A scrape runs on a thread of its own (at most MAX_CLIENTS at
once, each with a socket timeout, the TLS handshake on that thread too), so a slow or stuck scraper
holds a thread of this server, never the compute.
"""
from __future__ import annotations

import hmac
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.core import Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from .node import Node
from .servicer import REFUSAL_CODES

log = logging.getLogger(__name__)

MAX_CLIENTS = 8          # scrapes served at once; more connections are closed at once
CLIENT_TIMEOUT = 10.0    # seconds a connection may sit in the handshake or between bytes
KINDS = ("weights", "kv", "other")


def _fam(kind: str, name: str, help_: str, value: float | None = None) -> Metric:
    fam = Metric(name[:-6] if kind == "counter" else name, help_, kind)
    if value is not None:
        fam.add_sample(name, {}, float(value))
    return fam


class NodeCollector(Collector):
    def __init__(self, node: Node, max_sessions: int = 0) -> None:
        self.node = node
        self.max_sessions = max_sessions

    def collect(self) -> Iterator[Metric]:
        node, st = self.node, self.node.stats.snapshot()
        yield _fam("gauge", "llamarpc_server:sessions", "Sessions open (one per frontend).", node.n_sessions)
        if self.max_sessions:
            yield _fam("gauge", "llamarpc_server:sessions_max", "Sessions the node admits (--max-sessions).",
                       self.max_sessions)
        by_kind = node.memory.bytes_by_kind()
        bufs = _fam("gauge", "llamarpc_server:buffers", "Buffers allocated, by what they hold.")
        held = _fam("gauge", "llamarpc_server:held_bytes",
                    "Bytes held: buffers by what they hold (weights, kv, other) and the compiled programs' "
                    "scratch arenas (scratch).")
        for kind in (*KINDS, *sorted(set(by_kind) - set(KINDS))):
            n, b = by_kind.get(kind, (0, 0))
            bufs.add_sample("llamarpc_server:buffers", {"kind": kind}, float(n))
            held.add_sample("llamarpc_server:held_bytes", {"kind": kind}, float(b))
        held.add_sample("llamarpc_server:held_bytes", {"kind": "scratch"}, float(node.scratch_bytes()))
        yield bufs
        yield held
        yield _fam("gauge", "llamarpc_server:memory_capacity_bytes", "Bytes the node offers (--mem less --reserve-memory).",
                   node.memory.capacity)
        yield _fam("gauge", "llamarpc_server:memory_used_bytes", "Bytes of the capacity allocated to buffers.",
                   node.memory.used)
        yield _fam("counter", "llamarpc_server:compute_calls_total", "Computes run.", st["compute_calls"])
        yield _fam("counter", "llamarpc_server:compute_seconds_total", "Seconds spent computing.",
                   st["compute_seconds"])
        yield _fam("counter", "llamarpc_server:received_bytes_total", "Bytes received: SetTensor data and Compute inputs.",
                   st["bytes_received"])
        yield _fam("counter", "llamarpc_server:sent_bytes_total", "Bytes sent: GetTensor data and Compute outputs.",
                   st["bytes_sent"])
        yield _fam("counter", "llamarpc_server:weight_cache_hits_total",
                   "SetTensorFromCache calls answered from the weight cache.", st["cache_hits"])
        yield _fam("counter", "llamarpc_server:weight_cache_misses_total",
                   "SetTensorFromCache calls the weight cache could not answer (the bytes are sent).",
                   st["cache_misses"])
        rej = _fam("counter", "llamarpc_server:rejected_requests_total", "Calls refused, by gRPC status code.")
        rejected: dict[str, int] = st["rejected"]  # type: ignore[assignment]
        for code in sorted(set(REFUSAL_CODES) | set(rejected)):
            rej.add_sample("llamarpc_server:rejected_requests_total", {"code": code}, float(rejected.get(code, 0)))
        yield rej


def node_registry(node: Node, max_sessions: int = 0) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    registry.register(NodeCollector(node, max_sessions))
    return registry


Start = Callable[[str, list[tuple[str, str]]], Any]


def guarded_app(registry: CollectorRegistry, token: str | None) -> Callable[[dict, Start], Iterable[bytes]]:
    """GET /metrics (a token required when there is one); anything else 404/405."""
    inner = make_wsgi_app(registry)
    expected = f"Bearer {token}".encode() if token else None

    def app(environ: dict, start: Start) -> Iterable[bytes]:
        def plain(status: str, text: str, extra: tuple[tuple[str, str], ...] = ()) -> list[bytes]:
            body = text.encode()
            start(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))), *extra])
            return [body]

        if environ.get("PATH_INFO") != "/metrics":
            return plain("404 Not Found", "not found: this port serves /metrics\n")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return plain("405 Method Not Allowed", "use GET\n", (("Allow", "GET, HEAD"),))
        if expected is not None:
            got = environ.get("HTTP_AUTHORIZATION", "").encode("latin-1", "replace")
            if not hmac.compare_digest(got, expected):
                return plain("401 Unauthorized", "missing or wrong auth token\n", (("WWW-Authenticate", "Bearer"),))
        return inner(environ, start)

    return app


class _Handler(WSGIRequestHandler):
    timeout = CLIENT_TIMEOUT

    def setup(self) -> None:
        self.request.settimeout(self.timeout)
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()     # on this connection's thread, under its timeout
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("metrics %s: " + format, self.address_string(), *args)


class _Server(ThreadingWSGIServer):
    def __init__(self, *args: Any, **kw: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        super().__init__(*args, **kw)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics: connection from %s failed", client_address, exc_info=True)


class MetricsServer:
    """The node's /metrics on `host:port` (port 0: any free one), on a daemon thread."""

    def __init__(self, node: Node, host: str, port: int, *, token: str | None = None,
                 tls_files: tuple[str, str] | None = None, max_sessions: int = 0) -> None:
        bare = host.strip("[]")
        family = socket.getaddrinfo(bare, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

        class Server(_Server):
            address_family = family

        self.tls = tls_files is not None
        self.httpd = make_server(bare, port, guarded_app(node_registry(node, max_sessions), token), Server,
                                 handler_class=_Handler)
        if tls_files is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(certfile=tls_files[0], keyfile=tls_files[1])
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True, do_handshake_on_connect=False)
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
