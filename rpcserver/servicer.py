"""The gRPC face of a node: proto in, Node calls, proto out; errors become gRPC statuses.

Every handler goes through `_guard`, which maps the shared error classes to their status codes
(INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, FAILED_PRECONDITION) and anything unexpected to
INTERNAL, so one bad request never takes the node down.

Fairness (`SessionLimits`): a node has at most `max_sessions` sessions, one client address at most
`sessions_per_client` of them; a session's buffers count against its own byte quota and its
client's. Keepalive: the node pings every connection every `keepalive` seconds and drops one that
does not answer (so a vanished frontend's sessions are freed), and it accepts the clients' pings
down to one per second, with or without calls or data in flight (a client pinging faster is cut off
with GOAWAY, gRPC's ping-flood rule). A call naming a session the node no longer has fails with
FAILED_PRECONDITION and the trailing metadata `llamarpc-session-lost: <session id>`.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from llamarpc.proto import pb, pb_grpc
from llamarpc.proto.arrays import array_from_pb, array_to_pb
from llamarpc.proto.errors import BackendError, FailedPrecondition, InvalidArgument

from .memory import Quota
from .node import DEFAULT_MAX_MESSAGE, Node
from .stats import NodeStats
from .tensor_cache import TensorCache

log = logging.getLogger(__name__)

SESSION_KEY = "llamarpc-session"
SESSION_LOST_KEY = "llamarpc-session-lost"   # trailing metadata: the session the node does not know
CHUNK = 4 << 20
MAX_INPUTS = 64
DEFAULT_KEEPALIVE = 10.0      # seconds between the node's pings; a client silent this long after one is dropped
MIN_CLIENT_PING_MS = 1000     # clients may ping this often (RemoteBackend: every 5 s by default, at least 2 s)
MAX_SESSIONS_LIMIT = 1024     # each session holds a server thread
_CODES = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION,
    "UNAUTHENTICATED": grpc.StatusCode.UNAUTHENTICATED,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "INTERNAL": grpc.StatusCode.INTERNAL,
}
# the codes a node refuses calls with (UNAVAILABLE is the client's own reading of a lost node)
REFUSAL_CODES = tuple(sorted(set(_CODES) - {"UNAVAILABLE"}))


def _abort(stats: NodeStats, context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    """End the call with `code` (raises), counted in the node's rejected calls by code."""
    stats.reject(code.name)
    context.abort(code, message)


def _guard(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(self: BackendServicer, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except BackendError as e:
            _abort(self.stats, context, _CODES[e.status.value], e.message)
        except (ValueError, TypeError, OverflowError) as e:   # protobuf or numpy rejecting a field
            _abort(self.stats, context, grpc.StatusCode.INVALID_ARGUMENT, f"{type(e).__name__}: {e}")
        except MemoryError:
            _abort(self.stats, context, grpc.StatusCode.RESOURCE_EXHAUSTED, "out of memory")
    return wrapper


def _metadata_session(context: grpc.ServicerContext) -> str | None:
    for k, v in context.invocation_metadata():
        if k == SESSION_KEY:
            return v
    return None


def client_address(peer: str) -> tuple[str, bool]:
    """(the client's address, whether it is on this machine) from a gRPC peer string such as
    "ipv4:10.0.0.5:43210", "ipv6:[::1]:43210" or "unix:/run/x.sock". Ports are dropped (one host,
    one client, whichever connection); IPv4-mapped IPv6 addresses count as their IPv4 address;
    every Unix-socket peer is one local client."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host = rest.rsplit(":", 1)[0] if rest.count(":") and not rest.endswith("]") else rest
        host = host.strip("[]").split("%", 1)[0]
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return peer[:128], False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return str(ip), ip.is_loopback
    if kind.startswith("unix"):
        return "unix", True
    return peer[:128] or "unknown", False


@dataclasses.dataclass(frozen=True)
class SessionLimits:
    """What one client may take of a node. Byte limits: None is the default (a fair share, half
    the capacity, for clients on the network; no cap beyond the capacity for clients on this
    machine, which all share one address and could take its memory without the node anyway);
    0 is no cap; a number caps every client, loopback included."""

    max_sessions: int = 16
    sessions_per_client: int = 4
    session_mem: int | None = None   # bytes one session may hold
    client_mem: int | None = None    # bytes all sessions of one client address may hold together

    def __post_init__(self) -> None:
        if not 1 <= self.max_sessions <= MAX_SESSIONS_LIMIT:
            raise ValueError(f"max sessions must be in 1..{MAX_SESSIONS_LIMIT}, got {self.max_sessions}")
        if not 1 <= self.sessions_per_client <= self.max_sessions:
            raise ValueError(f"sessions per client must be in 1..{self.max_sessions} (the max sessions), "
                             f"got {self.sessions_per_client}")
        for name in ("session_mem", "client_mem"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"{name.replace('_', ' ')} must be >= 0 bytes, got {v}")

    def bytes_for(self, which: str, capacity: int, local: bool) -> int:
        """The byte cap of a session ("session_mem") or client ("client_mem"); 0 = none."""
        v = getattr(self, which)
        if v is None:
            return 0 if local else capacity // 2
        return v


class _Client:
    __slots__ = ("sessions", "quota")

    def __init__(self, quota: Quota | None) -> None:
        self.sessions = 0
        self.quota = quota


class BackendServicer(pb_grpc.BackendServicer):
    def __init__(self, node: Node, cache: TensorCache, max_sessions: int = 16,
                 limits: SessionLimits | None = None) -> None:
        self.node = node
        self.cache = cache
        self.stats = node.stats
        # each open session holds a server thread (its Hello stream): cap them so that threads are
        # always left for the other calls
        self.limits = limits or SessionLimits(max_sessions=max_sessions,
                                              sessions_per_client=min(4, max_sessions))
        self.max_sessions = self.limits.max_sessions
        self._open_sessions = 0
        self._clients: dict[str, _Client] = {}
        self._sessions_lock = threading.Lock()

    def _session(self, context: grpc.ServicerContext) -> str:
        sid = _metadata_session(context)
        if sid is None:
            raise FailedPrecondition("no session: call Hello first and send its session_id as metadata")
        try:
            self.node.check_session(sid)
        except FailedPrecondition:
            context.set_trailing_metadata(((SESSION_LOST_KEY, sid[:64]),))
            raise FailedPrecondition(f"unknown session {sid[:8]!r}: the node was restarted or the session was "
                                     "closed; open a new one (Hello)") from None
        return sid

    def _admit(self, address: str, local: bool) -> tuple[_Client | None, str]:
        """Count a new session of `address` in; (its client, '') or (None, why it is refused)."""
        lim = self.limits
        with self._sessions_lock:
            if self._open_sessions >= lim.max_sessions:
                return None, f"the node has its maximum of {lim.max_sessions} sessions open (--max-sessions)"
            client = self._clients.get(address)
            if client is not None and client.sessions >= lim.sessions_per_client:
                return None, (f"client {address} has its maximum of {lim.sessions_per_client} sessions open on "
                              "this node (--sessions-per-client)")
            if client is None:
                cap = lim.bytes_for("client_mem", self.node.memory.capacity, local)
                client = self._clients[address] = _Client(
                    Quota(cap, f"client {address} (--client-mem)") if cap else None)
            client.sessions += 1
            self._open_sessions += 1
            return client, ""

    def _leave(self, address: str, client: _Client) -> None:
        with self._sessions_lock:
            self._open_sessions -= 1
            client.sessions -= 1
            if client.sessions == 0 and self._clients.get(address) is client:
                del self._clients[address]

    def Hello(self, request: pb.HelloRequest, context: grpc.ServicerContext) -> Iterator[pb.HelloReply]:
        address, local = client_address(context.peer())
        client, why = self._admit(address, local)
        if client is None:
            log.info("session refused to %s: %s", address, why)
            _abort(self.stats, context, grpc.StatusCode.RESOURCE_EXHAUSTED, why)
        try:
            try:
                reply = self.node.hello(request.protocol_version, request.client_name)
            except BackendError as e:
                _abort(self.stats, context, _CODES[e.status.value], e.message)
            sid = reply.session_id
            try:
                cap = self.limits.bytes_for("session_mem", self.node.memory.capacity, local)
                quotas = [Quota(cap, "this session (--session-mem)")] if cap else []
                if client.quota is not None:
                    quotas.append(client.quota)
                self.node.memory.set_quotas(sid, tuple(quotas))
                done = threading.Event()
                context.add_callback(done.set)
                yield reply
                # the session lives as long as this stream; the stream ends when the node has
                # closed the session, so the client learns at once that it must open a new one
                while context.is_active() and not done.wait(1.0):
                    try:
                        self.node.check_session(sid)
                    except FailedPrecondition:
                        break
            finally:
                self.node.close_session(sid)
                self.node.memory.set_quotas(sid, ())
        finally:
            self._leave(address, client)

    @_guard
    def GetMemory(self, request: pb.GetMemoryRequest, context: grpc.ServicerContext) -> pb.MemoryReply:
        """Free bytes as the calling session sees them (within its quotas); without a session, the
        node's. Total is the node's capacity."""
        free, total = self.node.get_memory()
        sid = _metadata_session(context)
        if sid is not None:
            try:
                self.node.check_session(sid)
            except FailedPrecondition:
                pass
            else:
                free = self.node.memory.free_for(sid)
        return pb.MemoryReply(free_bytes=free, total_bytes=total)

    @_guard
    def AllocBuffer(self, request: pb.AllocBufferRequest, context: grpc.ServicerContext) -> pb.AllocBufferReply:
        bid = self.node.alloc_buffer(self._session(context), request.size)
        return pb.AllocBufferReply(buffer_id=bid, size=request.size)

    @_guard
    def FreeBuffer(self, request: pb.BufferRequest, context: grpc.ServicerContext) -> pb.Empty:
        self.node.free_buffer(self._session(context), request.buffer_id)
        return pb.Empty()

    @_guard
    def ClearBuffer(self, request: pb.ClearBufferRequest, context: grpc.ServicerContext) -> pb.Empty:
        self.node.clear_buffer(self._session(context), request.buffer_id, request.value)
        return pb.Empty()

    @_guard
    def SetTensor(self, request_iterator: Iterator[pb.SetTensorChunk], context: grpc.ServicerContext) -> pb.SetTensorReply:
        session = self._session(context)
        header: pb.SetTensorHeader | None = None
        written = 0
        digest = hashlib.sha256()
        for chunk in request_iterator:
            if header is None:
                if not chunk.HasField("header"):
                    raise InvalidArgument("set_tensor: the first chunk must carry the header")
                header = chunk.header
                buf = self.node.memory.get(session, header.buffer_id)
                buf.check_range(header.offset, header.size, "set_tensor")
                if header.sha256 and len(header.sha256) != 32:
                    raise InvalidArgument("set_tensor: sha256 must be 32 bytes")
            elif chunk.HasField("header"):
                raise InvalidArgument("set_tensor: only the first chunk may carry a header")
            data = chunk.data
            if written + len(data) > header.size:
                raise InvalidArgument(f"set_tensor: more than the announced {header.size} bytes")
            if data:
                self.node.set_tensor(session, header.buffer_id, header.offset + written, data)
                digest.update(data)
                written += len(data)
        if header is None:
            raise InvalidArgument("set_tensor: no chunks")
        if written != header.size:
            raise InvalidArgument(f"set_tensor: announced {header.size} bytes, received {written}")
        self.stats.moved(received=written)
        if header.sha256:
            if digest.digest() != header.sha256:
                raise InvalidArgument("set_tensor: the data does not match its sha256")
            self.node.note_digest(session, header.buffer_id, header.offset, header.size, header.sha256)
            if header.cache:
                self.cache.put(header.sha256,
                               self.node.get_tensor(session, header.buffer_id, header.offset, header.size).tobytes())
        return pb.SetTensorReply(bytes_written=written)

    @_guard
    def SetTensorFromCache(self, request: pb.SetTensorFromCacheRequest,
                           context: grpc.ServicerContext) -> pb.SetTensorFromCacheReply:
        session = self._session(context)
        buf = self.node.memory.get(session, request.buffer_id)
        buf.check_range(request.offset, request.size, "set_tensor_from_cache")
        if len(request.sha256) != 32:
            raise InvalidArgument("set_tensor_from_cache: sha256 must be 32 bytes")
        hit = self.node.fill_from_cache(session, request.buffer_id, request.offset, request.size, request.sha256,
                                        self.cache)
        return pb.SetTensorFromCacheReply(hit=hit)

    def GetTensor(self, request: pb.GetTensorRequest, context: grpc.ServicerContext) -> Iterator[pb.TensorChunk]:
        try:
            session = self._session(context)
            buf = self.node.memory.get(session, request.buffer_id)
            buf.check_range(request.offset, request.size, "get_tensor")
        except BackendError as e:
            _abort(self.stats, context, _CODES[e.status.value], e.message)
        for off in range(0, request.size, CHUNK):
            n = min(CHUNK, request.size - off)
            try:
                data = self.node.get_tensor(session, request.buffer_id, request.offset + off, n)
            except BackendError as e:
                _abort(self.stats, context, _CODES[e.status.value], e.message)
            self.stats.moved(sent=n)
            yield pb.TensorChunk(data=data.tobytes())

    @_guard
    def CopyTensor(self, request: pb.CopyTensorRequest, context: grpc.ServicerContext) -> pb.Empty:
        self.node.copy_tensor(self._session(context), request.src_buffer_id, request.src_offset,
                              request.dst_buffer_id, request.dst_offset, request.size)
        return pb.Empty()

    @_guard
    def RegisterGraph(self, request: pb.RegisterGraphRequest, context: grpc.ServicerContext) -> pb.RegisterGraphReply:
        return pb.RegisterGraphReply(graph_id=self.node.register_graph(self._session(context), request.graph))

    @_guard
    def ReleaseGraph(self, request: pb.ReleaseGraphRequest, context: grpc.ServicerContext) -> pb.Empty:
        self.node.release_graph(self._session(context), request.graph_id)
        return pb.Empty()

    @_guard
    def Compute(self, request: pb.ComputeRequest, context: grpc.ServicerContext) -> pb.ComputeReply:
        session = self._session(context)
        if len(request.inputs) > MAX_INPUTS:
            raise InvalidArgument(f"at most {MAX_INPUTS} inputs")
        inputs = {}
        for item in request.inputs:
            if item.name in inputs:
                raise InvalidArgument(f"input {item.name!r} given twice")
            inputs[item.name] = array_from_pb(item.array, f"input {item.name[:64]!r}")
        t0 = time.perf_counter()
        out = self.node.compute(session, request.graph_id, inputs)
        reply = pb.ComputeReply(outputs=[pb.NamedArray(name=k, array=array_to_pb(v)) for k, v in out.items()],
                                compute_seconds=time.perf_counter() - t0)
        self.stats.moved(received=request.ByteSize(), sent=reply.ByteSize())
        return reply


class _TokenAuth(grpc.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every call but the health service."""

    def __init__(self, token: str, stats: NodeStats) -> None:
        self._token = f"Bearer {token}".encode()

        def deny(request: Any, context: grpc.ServicerContext) -> None:
            _abort(stats, context, grpc.StatusCode.UNAUTHENTICATED, "missing or wrong auth token")

        self._deny = deny

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        if details.method.startswith("/grpc.health.v1.Health/"):
            return continuation(details)
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(got.encode(), self._token):
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(lambda it, ctx: self._deny(None, ctx))
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(lambda it, ctx: self._deny(None, ctx))
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(lambda r, ctx: self._deny(r, ctx))
        return grpc.unary_unary_rpc_method_handler(self._deny)


class _DecodeGuard(grpc.ServerInterceptor):
    """Bytes that are no valid message of the method's request type get INVALID_ARGUMENT (gRPC's
    own deserializer answers INTERNAL): requests reach the handler undecoded and are parsed here."""

    def __init__(self, stats: NodeStats) -> None:
        self._stats = stats

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def decode(raw: bytes, context: grpc.ServicerContext) -> Any:
            try:
                return parse(raw)
            except DecodeError as e:
                _abort(self._stats, context, grpc.StatusCode.INVALID_ARGUMENT, f"invalid {details.method} request: {e}")

        if handler.request_streaming:
            inner = handler.stream_stream or handler.stream_unary

            def streamed(it: Iterator[bytes], context: grpc.ServicerContext) -> Any:
                return inner((decode(raw, context) for raw in it), context)
            kind = "stream_stream" if handler.response_streaming else "stream_unary"
        else:
            inner = handler.unary_stream or handler.unary_unary

            def streamed(raw: bytes, context: grpc.ServicerContext) -> Any:  # type: ignore[misc]
                return inner(decode(raw, context), context)
            kind = "unary_stream" if handler.response_streaming else "unary_unary"
        return handler._replace(request_deserializer=None, **{kind: streamed})


def channel_options(max_message: int = DEFAULT_MAX_MESSAGE) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_message), ("grpc.max_send_message_length", max_message)]


def server_options(keepalive: float = DEFAULT_KEEPALIVE,
                   max_message: int = DEFAULT_MAX_MESSAGE) -> list[tuple[str, int]]:
    """The node's channel arguments: message sizes and the keepalive rules it shares with
    RemoteBackend (see the module doc)."""
    if not 1.0 <= keepalive <= 3600.0:
        raise ValueError(f"keepalive must be 1..3600 seconds, got {keepalive}")
    ms = int(keepalive * 1000)
    return [*channel_options(max_message),
            ("grpc.keepalive_time_ms", ms), ("grpc.keepalive_timeout_ms", ms), ("grpc.http2.ping_timeout_ms", ms),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_MS),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.http2.max_pings_without_data", 0)]


def make_server(node: Node, address: str, *, cache: TensorCache | None = None, token: str | None = None,
                tls: tuple[bytes, bytes] | None = None, max_workers: int | None = None,
                limits: SessionLimits | None = None,
                keepalive: float = DEFAULT_KEEPALIVE) -> tuple[grpc.Server, int, BackendServicer]:
    """A started-ready (not started) server bound to `address`; returns (server, port, servicer).
    Every session holds a worker thread: `max_workers` (default: the sessions + 16) leaves 16 or
    more for the other calls."""
    limits = limits or SessionLimits()
    if max_workers is None:
        max_workers = limits.max_sessions + 16
    if max_workers < limits.max_sessions + 4:
        raise ValueError(f"{max_workers} workers for {limits.max_sessions} sessions: calls would find no thread")
    interceptors = [*([_TokenAuth(token, node.stats)] if token else []), _DecodeGuard(node.stats)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), interceptors=interceptors,
                         options=server_options(keepalive), maximum_concurrent_rpcs=max_workers * 4)
    servicer = BackendServicer(node, cache or TensorCache(None), limits=limits)
    pb_grpc.add_BackendServicer_to_server(servicer, server)
    hs = health.HealthServicer()
    hs.set("", health_pb2.HealthCheckResponse.SERVING)
    hs.set("llamarpc.v1.Backend", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    if tls:
        creds = grpc.ssl_server_credentials([(tls[0], tls[1])])
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return server, port, servicer
