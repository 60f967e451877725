"""RemoteBackend: a compute node over gRPC, with the same interface and errors as LocalBackend.

Every call has a deadline; only idempotent calls are retried; a node that does not answer raises
NodeUnavailable naming its address. The session lives as long as the Hello stream: when this
client goes away (or calls close), the node frees everything the session held.

Keepalive, agreed with the node (rpcserver/servicer.py): the client pings every `keepalive`
seconds (default 5; LLAMARPC_RPC_KEEPALIVE) with or without calls or data in flight, and the node
accepts pings down to one per second, so an idle session lives as long as both ends do; a node that
does not answer a ping within `keepalive_timeout` seconds (default 5;
LLAMARPC_RPC_KEEPALIVE_TIMEOUT) is taken for gone: its session stream fails, `alive` turns False.
`alive` also turns False when the node ends the session stream (it closed the session) or answers
a call with "session lost" (it no longer knows the session, e.g. it restarted); such a call raises
NodeUnavailable, and `reconnect()` opens a new session.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
from llamarpc.proto import PROTOCOL_VERSION, pb, pb_grpc
from llamarpc.proto.arrays import array_from_pb, array_to_pb
from llamarpc.proto.errors import ERROR_BY_STATUS, BackendError, FailedPrecondition, NodeUnavailable, Status

from .backend import Backend, NodeInfo, Pending

log = logging.getLogger(__name__)

SESSION_KEY = "llamarpc-session"
SESSION_LOST_KEY = "llamarpc-session-lost"
CHUNK = 4 << 20
MAX_MESSAGE = 64 << 20
DEFAULT_KEEPALIVE = 5.0
DEFAULT_KEEPALIVE_TIMEOUT = 5.0
MIN_KEEPALIVE = 2.0      # nodes accept a ping per second at most; twice that leaves room for jitter


def _seconds(value: float | None, env: str, default: float, lo: float, what: str) -> float:
    if value is None:
        text = os.environ.get(env, "")
        try:
            value = float(text) if text.strip() else default
        except ValueError:
            raise ValueError(f"{env}={text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and lo <= value <= 3600.0):
        raise ValueError(f"{what} must be {lo:g}..3600 seconds, got {value}")
    return float(value)


def _bytes_view(data: np.ndarray | bytes | memoryview) -> memoryview:
    if isinstance(data, np.ndarray):
        return memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
    return memoryview(data).cast("B")


class RemoteBackend(Backend):
    def __init__(self, address: str, *, token: str | None = None, tls_ca: bytes | None = None,
                 tls_server_name: str | None = None, timeout: float = 30.0, compute_timeout: float = 120.0,
                 connect_timeout: float = 10.0, client_name: str = "llamarpc",
                 keepalive: float | None = None, keepalive_timeout: float | None = None) -> None:
        self.keepalive = _seconds(keepalive, "LLAMARPC_RPC_KEEPALIVE", DEFAULT_KEEPALIVE, MIN_KEEPALIVE, "keepalive")
        self.keepalive_timeout = _seconds(keepalive_timeout, "LLAMARPC_RPC_KEEPALIVE_TIMEOUT",
                                          DEFAULT_KEEPALIVE_TIMEOUT, 0.5, "keepalive timeout")
        self.address = address
        self.name = address
        self.timeout = timeout
        self.compute_timeout = compute_timeout
        self.connect_timeout = connect_timeout
        self.client_name = client_name
        self._token = token
        self._tls_ca = tls_ca
        self._tls_server_name = tls_server_name
        self._channel: grpc.Channel | None = None
        self._hello_stream: Any = None
        self._session = ""
        self._alive = False
        self.info: NodeInfo | None = None
        self._lock = threading.Lock()
        self.connect()

    # -- connection -------------------------------------------------------------------------------
    def connect(self) -> NodeInfo:
        """(Re)open the channel and a new session. Buffers of an earlier session are gone."""
        self._close_channel()
        opts = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE),
                # pings the node accepts (rpcserver/servicer.py), also on a connection without data;
                # grpcio 1.85 closes a connection whose ping goes unanswered only with ping_timeout_ms
                # (keepalive_timeout_ms alone left a frozen node undetected for 30 s and more)
                ("grpc.keepalive_time_ms", int(self.keepalive * 1000)),
                ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout * 1000)),
                ("grpc.http2.ping_timeout_ms", int(self.keepalive_timeout * 1000)),
                ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
                ("grpc.enable_retries", 0),
                # a fresh connection on reconnect: never a shared subchannel still backing off
                ("grpc.use_local_subchannel_pool", 1), ("grpc.enable_http_proxy", 0),
                ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000)]
        if self._tls_server_name:
            opts.append(("grpc.ssl_target_name_override", self._tls_server_name))
        if self._tls_ca is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=self._tls_ca)
            self._channel = grpc.secure_channel(self.address, creds, options=opts)
        else:
            self._channel = grpc.insecure_channel(self.address, options=opts)
        self._stub = pb_grpc.BackendStub(self._channel)
        try:
            stream = self._stub.Hello(pb.HelloRequest(protocol_version=PROTOCOL_VERSION, client_name=self.client_name),
                                      metadata=self._auth_metadata(), timeout=None,
                                      wait_for_ready=False)
            reply = self._first(stream)
        except grpc.RpcError as e:
            self._close_channel()
            raise self._error(e) from None
        except BaseException:
            self._close_channel()
            raise
        if reply.protocol_version != PROTOCOL_VERSION:
            stream.cancel()
            self._close_channel()
            raise FailedPrecondition(f"protocol version mismatch: node speaks {reply.protocol_version}, "
                                     f"client speaks {PROTOCOL_VERSION}", node=self.address)
        self._hello_stream = stream
        self._alive = True
        threading.Thread(target=self._watch, args=(stream,), name=f"watch-{self.address}", daemon=True).start()
        self._session = reply.session_id
        self.info = NodeInfo(reply.node_name, reply.device, reply.alignment,
                             frozenset(reply.quantized_types), frozenset(reply.ops))
        log.debug("%s: session %s", self.address, self._session[:8])
        return self.info

    def _watch(self, stream: Any) -> None:
        """The session stream ends when the node goes away (or we close it)."""
        try:
            for _ in stream:
                pass
        except grpc.RpcError:
            pass
        if stream is self._hello_stream:
            self._alive = False
            log.warning("%s: session ended (node gone?)", self.address)

    @property
    def alive(self) -> bool:
        return self._alive

    def reconnect(self) -> NodeInfo:
        return self.connect()

    def _first(self, stream: Any) -> pb.HelloReply:
        box: dict[str, Any] = {}

        def read() -> None:
            try:
                box["reply"] = next(stream)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                box["error"] = e

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(self.connect_timeout)
        if t.is_alive():
            stream.cancel()
            raise NodeUnavailable(f"no answer within {self.connect_timeout:.0f} s", node=self.address)
        if "error" in box:
            err = box["error"]
            if isinstance(err, grpc.RpcError):
                raise err
            if isinstance(err, StopIteration):
                raise NodeUnavailable("the node closed the session stream", node=self.address)
            raise err
        return box["reply"]

    def _auth_metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self._token}")] if self._token else []

    def _metadata(self) -> list[tuple[str, str]]:
        return [(SESSION_KEY, self._session), *self._auth_metadata()]

    def _error(self, e: grpc.RpcError) -> BackendError:
        code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
        detail = (e.details() if hasattr(e, "details") else str(e)) or code.name
        if code == grpc.StatusCode.FAILED_PRECONDITION and self._session_lost(e):
            return NodeUnavailable(f"session lost: {detail}", node=self.address)
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
            return NodeUnavailable(f"{code.name.lower()}: {detail}", node=self.address)
        try:
            cls = ERROR_BY_STATUS[Status(code.name)]
        except ValueError:
            cls = BackendError
        return cls(detail, node=self.address)

    def _session_lost(self, e: grpc.RpcError) -> bool:
        """The node says it no longer knows our session (restarted, or closed it): we are not alive
        until reconnect(). An answer about an earlier session changes nothing."""
        try:
            trailing = e.trailing_metadata() or ()
        except Exception:  # noqa: BLE001 - not every RpcError carries metadata
            trailing = ()
        lost = next((v for k, v in trailing if k == SESSION_LOST_KEY), None)
        if lost is None or lost != self._session[:64]:
            return False
        if self._alive:
            self._alive = False
            log.warning("%s: the node no longer knows session %s; a new one is needed", self.address,
                        self._session[:8])
        return True

    def _call(self, fn: Callable, request: Any, *, timeout: float | None = None, retries: int = 0) -> Any:
        for attempt in range(retries + 1):
            try:
                return fn(request, metadata=self._metadata(), timeout=timeout or self.timeout)
            except grpc.RpcError as e:
                err = self._error(e)
                if not isinstance(err, NodeUnavailable) or attempt == retries:
                    raise err from None
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    # -- Backend ----------------------------------------------------------------------------------
    def hello(self) -> NodeInfo:
        assert self.info is not None
        return self.info

    def get_memory(self) -> tuple[int, int]:
        r = self._call(self._stub.GetMemory, pb.GetMemoryRequest(), retries=2)
        return r.free_bytes, r.total_bytes

    def alloc_buffer(self, size: int) -> int:
        return self._call(self._stub.AllocBuffer, pb.AllocBufferRequest(size=size)).buffer_id

    def free_buffer(self, buffer_id: int) -> None:
        self._call(self._stub.FreeBuffer, pb.BufferRequest(buffer_id=buffer_id))

    def clear_buffer(self, buffer_id: int, value: int = 0) -> None:
        self._call(self._stub.ClearBuffer, pb.ClearBufferRequest(buffer_id=buffer_id, value=value), retries=2)

    def set_tensor(self, buffer_id: int, offset: int, data: np.ndarray | bytes | memoryview,
                   cache: bool = False) -> int:
        mv = _bytes_view(data)
        digest = hashlib.sha256(mv).digest() if cache else b""
        if cache:
            r = self._call(self._stub.SetTensorFromCache, pb.SetTensorFromCacheRequest(
                buffer_id=buffer_id, offset=offset, size=mv.nbytes, sha256=digest), retries=2)
            self._cache_answer(r.hit)
            if r.hit:
                return 0
        return self._stream(buffer_id, offset, mv, digest, cache)

    def _stream(self, buffer_id: int, offset: int, mv: memoryview, digest: bytes, cache: bool) -> int:
        def chunks() -> Iterator[pb.SetTensorChunk]:
            header = pb.SetTensorHeader(buffer_id=buffer_id, offset=offset, size=mv.nbytes, sha256=digest, cache=cache)
            if mv.nbytes == 0:
                yield pb.SetTensorChunk(header=header)
            for i, start in enumerate(range(0, mv.nbytes, CHUNK)):
                part = bytes(mv[start:start + CHUNK])
                yield pb.SetTensorChunk(header=header, data=part) if i == 0 else pb.SetTensorChunk(data=part)

        timeout = self.timeout + mv.nbytes / (20 << 20)  # allow 20 MiB/s at worst
        try:
            self._stub.SetTensor(chunks(), metadata=self._metadata(), timeout=timeout)
        except grpc.RpcError as e:
            raise self._error(e) from None
        self.stats.bytes_sent += mv.nbytes
        return mv.nbytes

    def _cache_answer(self, hit: bool) -> None:
        if hit:
            self.stats.cache_hits += 1
        else:
            self.stats.cache_misses += 1

    def set_tensors(self, items: list[tuple[int, int, np.ndarray]], cache: bool = False,
                    progress: Callable[[int], None] | None = None,
                    digests: list[bytes] | None = None) -> int:
        """Ask the node's cache for every item at once (pipelined), then stream the misses."""
        if not cache:
            return super().set_tensors(items, cache, progress)
        views = [_bytes_view(d) for _, _, d in items]
        if digests is None:
            digests = [hashlib.sha256(v).digest() for v in views]
        def ask(i: int) -> Any:
            (bid, off, _), v, d = items[i], views[i], digests[i]
            req = pb.SetTensorFromCacheRequest(buffer_id=bid, offset=off, size=v.nbytes, sha256=d)
            return self._stub.SetTensorFromCache.future(req, metadata=self._metadata(), timeout=self.timeout)

        window = 16   # requests in flight; a node admits a bounded number of concurrent calls
        futures = {i: ask(i) for i in range(min(window, len(items)))}
        sent = 0
        for i, ((bid, off, _), v, d) in enumerate(zip(items, views, digests)):
            try:
                hit = futures.pop(i).result().hit
            except grpc.RpcError as e:
                raise self._error(e) from None
            self._cache_answer(hit)
            if i + window < len(items):
                futures[i + window] = ask(i + window)
            if not hit:
                sent += self._stream(bid, off, v, d, True)
            if progress:
                progress(v.nbytes)
        return sent

    def get_tensor(self, buffer_id: int, offset: int, size: int) -> bytes:
        try:
            stream = self._stub.GetTensor(pb.GetTensorRequest(buffer_id=buffer_id, offset=offset, size=size),
                                          metadata=self._metadata(), timeout=self.timeout + size / (20 << 20))
            data = b"".join(c.data for c in stream)
        except grpc.RpcError as e:
            raise self._error(e) from None
        self.stats.bytes_received += len(data)
        return data

    def copy_tensor(self, src: int, src_offset: int, dst: int, dst_offset: int, size: int) -> None:
        self._call(self._stub.CopyTensor, pb.CopyTensorRequest(src_buffer_id=src, src_offset=src_offset,
                                                               dst_buffer_id=dst, dst_offset=dst_offset, size=size))

    def register_graph(self, graph: pb.Graph) -> int:
        return self._call(self._stub.RegisterGraph, pb.RegisterGraphRequest(graph=graph)).graph_id

    def compute(self, graph_id: int, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        req = pb.ComputeRequest(graph_id=graph_id, inputs=[pb.NamedArray(name=k, array=array_to_pb(v))
                                                           for k, v in inputs.items()])
        r = self._call(self._stub.Compute, req, timeout=self.compute_timeout)
        return self._computed(req, r)

    def _computed(self, req: pb.ComputeRequest, r: pb.ComputeReply) -> dict[str, np.ndarray]:
        st = self.stats
        st.compute_calls += 1
        st.compute_seconds += r.compute_seconds
        st.bytes_sent += req.ByteSize()
        st.bytes_received += r.ByteSize()
        return {o.name: array_from_pb(o.array, o.name) for o in r.outputs}

    def compute_async(self, graph_id: int, inputs: dict[str, np.ndarray]) -> Pending:
        req = pb.ComputeRequest(graph_id=graph_id, inputs=[pb.NamedArray(name=k, array=array_to_pb(v))
                                                           for k, v in inputs.items()])
        fut = self._stub.Compute.future(req, metadata=self._metadata(), timeout=self.compute_timeout)

        def wait() -> dict[str, np.ndarray]:
            try:
                r = fut.result()
            except grpc.RpcError as e:
                raise self._error(e) from None
            return self._computed(req, r)

        return Pending(wait=wait)

    def _close_channel(self) -> None:
        if self._hello_stream is not None:
            stream, self._hello_stream = self._hello_stream, None
            stream.cancel()
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def close(self) -> None:
        self._close_channel()
