"""The gRPC face of a node: proto in, Node calls, proto out; errors become gRPC statuses.

Every handler goes through `_guard`, which maps the shared error classes to their status codes
(INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, FAILED_PRECONDITION) and anything unexpected to
INTERNAL, so one bad request never takes the node down.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from llamarpc.proto import pb, pb_grpc
from llamarpc.proto.arrays import array_from_pb, array_to_pb
from llamarpc.proto.errors import BackendError, FailedPrecondition, InvalidArgument

from .node import DEFAULT_MAX_MESSAGE, Node
from .tensor_cache import TensorCache

log = logging.getLogger(__name__)

SESSION_KEY = "llamarpc-session"
CHUNK = 4 << 20
MAX_INPUTS = 64
_CODES = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION,
    "UNAUTHENTICATED": grpc.StatusCode.UNAUTHENTICATED,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "INTERNAL": grpc.StatusCode.INTERNAL,
}


def _guard(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(self: BackendServicer, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except BackendError as e:
            context.abort(_CODES[e.status.value], e.message)
        except (ValueError, TypeError, OverflowError) as e:   # protobuf or numpy rejecting a field
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{type(e).__name__}: {e}")
        except MemoryError:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "out of memory")
    return wrapper


def _session(context: grpc.ServicerContext) -> str:
    for k, v in context.invocation_metadata():
        if k == SESSION_KEY:
            return v
    raise FailedPrecondition("no session: call Hello first and send its session_id as metadata")


class BackendServicer(pb_grpc.BackendServicer):
    def __init__(self, node: Node, cache: TensorCache, max_sessions: int = 16) -> None:
        self.node = node
        self.cache = cache
        self.bytes_received = 0
        # each open session holds a server thread (its Hello stream): cap them so that threads are
        # always left for the other calls
        self.max_sessions = max_sessions
        self._open_sessions = 0
        self._sessions_lock = threading.Lock()

    def Hello(self, request: pb.HelloRequest, context: grpc.ServicerContext) -> Iterator[pb.HelloReply]:
        with self._sessions_lock:
            full = self._open_sessions >= self.max_sessions
            if not full:
                self._open_sessions += 1
        if full:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"the node has its maximum of {self.max_sessions} sessions open")
        try:
            try:
                reply = self.node.hello(request.protocol_version, request.client_name)
            except BackendError as e:
                context.abort(_CODES[e.status.value], e.message)
            done = threading.Event()
            context.add_callback(done.set)
            try:
                yield reply
                while context.is_active() and not done.wait(5.0):
                    pass
            finally:
                self.node.close_session(reply.session_id)
        finally:
            with self._sessions_lock:
                self._open_sessions -= 1

    @_guard
    def GetMemory(self, request: pb.GetMemoryRequest, context: grpc.ServicerContext) -> pb.MemoryReply:
        free, total = self.node.get_memory()
        return pb.MemoryReply(free_bytes=free, total_bytes=total)

    @_guard
    def AllocBuffer(self, request: pb.AllocBufferRequest, context: grpc.ServicerContext) -> pb.AllocBufferReply:
        bid = self.node.alloc_buffer(_session(context), request.size)
        return pb.AllocBufferReply(buffer_id=bid, size=request.size)

    @_guard
    def FreeBuffer(self, request: pb.BufferRequest, context: grpc.ServicerContext) -> pb.Empty:
        self.node.free_buffer(_session(context), request.buffer_id)
        return pb.Empty()

    @_guard
    def ClearBuffer(self, request: pb.ClearBufferRequest, context: grpc.ServicerContext) -> pb.Empty:
        self.node.clear_buffer(_session(context), request.buffer_id, request.value)
        return pb.Empty()

    @_guard
    def SetTensor(self, request_iterator: Iterator[pb.SetTensorChunk], context: grpc.ServicerContext) -> pb.SetTensorReply:
        session = _session(context)
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
        self.bytes_received += written
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
        session = _session(context)
        buf = self.node.memory.get(session, request.buffer_id)
        buf.check_range(request.offset, request.size, "set_tensor_from_cache")
        if len(request.sha256) != 32:
            raise InvalidArgument("set_tensor_from_cache: sha256 must be 32 bytes")
        hit = self.node.fill_from_cache(session, request.buffer_id, request.offset, request.size, request.sha256,
                                        self.cache)
        return pb.SetTensorFromCacheReply(hit=hit)

    def GetTensor(self, request: pb.GetTensorRequest, context: grpc.ServicerContext) -> Iterator[pb.TensorChunk]:
        try:
            session = _session(context)
            buf = self.node.memory.get(session, request.buffer_id)
            buf.check_range(request.offset, request.size, "get_tensor")
        except BackendError as e:
            context.abort(_CODES[e.status.value], e.message)
        for off in range(0, request.size, CHUNK):
            n = min(CHUNK, request.size - off)
            try:
                data = self.node.get_tensor(session, request.buffer_id, request.offset + off, n)
            except BackendError as e:
                context.abort(_CODES[e.status.value], e.message)
            yield pb.TensorChunk(data=data.tobytes())

    @_guard
    def CopyTensor(self, request: pb.CopyTensorRequest, context: grpc.ServicerContext) -> pb.Empty:
        self.node.copy_tensor(_session(context), request.src_buffer_id, request.src_offset,
                              request.dst_buffer_id, request.dst_offset, request.size)
        return pb.Empty()

    @_guard
    def RegisterGraph(self, request: pb.RegisterGraphRequest, context: grpc.ServicerContext) -> pb.RegisterGraphReply:
        return pb.RegisterGraphReply(graph_id=self.node.register_graph(_session(context), request.graph))

    @_guard
    def ReleaseGraph(self, request: pb.ReleaseGraphRequest, context: grpc.ServicerContext) -> pb.Empty:
        self.node.release_graph(_session(context), request.graph_id)
        return pb.Empty()

    @_guard
    def Compute(self, request: pb.ComputeRequest, context: grpc.ServicerContext) -> pb.ComputeReply:
        session = _session(context)
        if len(request.inputs) > MAX_INPUTS:
            raise InvalidArgument(f"at most {MAX_INPUTS} inputs")
        inputs = {}
        for item in request.inputs:
            if item.name in inputs:
                raise InvalidArgument(f"input {item.name!r} given twice")
            inputs[item.name] = array_from_pb(item.array, f"input {item.name[:64]!r}")
        import time

        t0 = time.perf_counter()
        out = self.node.compute(session, request.graph_id, inputs)
        return pb.ComputeReply(outputs=[pb.NamedArray(name=k, array=array_to_pb(v)) for k, v in out.items()],
                               compute_seconds=time.perf_counter() - t0)


class _TokenAuth(grpc.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every call but the health service."""

    def __init__(self, token: str) -> None:
        self._token = f"Bearer {token}".encode()

        def deny(request: Any, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong auth token")

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


def channel_options(max_message: int = DEFAULT_MAX_MESSAGE) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_message), ("grpc.max_send_message_length", max_message)]


def make_server(node: Node, address: str, *, cache: TensorCache | None = None, token: str | None = None,
                tls: tuple[bytes, bytes] | None = None, max_workers: int = 32) -> tuple[grpc.Server, int, BackendServicer]:
    """A started-ready (not started) server bound to `address`; returns (server, port, servicer)."""
    interceptors = [_TokenAuth(token)] if token else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), interceptors=interceptors,
                         options=channel_options(), maximum_concurrent_rpcs=max_workers * 4)
    servicer = BackendServicer(node, cache or TensorCache(None), max_sessions=max(1, max_workers // 2))
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
