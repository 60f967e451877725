"""A compute node: buffers, registered graphs and the executor, per client session.

This is the whole node without a network: the gRPC servicer and the in-process LocalBackend both
call these methods. Sessions isolate clients from each other; closing a session frees its buffers.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import time
import uuid
from typing import Any

import numpy as np
from llamarpc.proto import PROTOCOL_VERSION, pb
from llamarpc.proto.errors import FailedPrecondition, InvalidArgument, NotFound
from llamarpc.proto.types import SUPPORTED_TYPES

from . import kernels, quant
from .device import Device, open_device
from .executor import execute
from .fuse import fuse_plan
from .graph import Plan, compile_graph
from .hostmem import tune_malloc
from .memory import ALIGNMENT, Memory
from .stats import NodeStats
from .tensor_cache import TensorCache

log = logging.getLogger(__name__)

MAX_GRAPHS_PER_SESSION = 1024
DEFAULT_MAX_MESSAGE = 64 << 20


def default_capacity() -> int:
    """Physical memory as the default capacity of a CPU node."""
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


class Node:
    """`matmul_mode` is how the CPU multiplies by stored quantized weights (see `quant`):
    "exact" (float32 activations), "fast" (8-bit activations, as llama.cpp) or "reference"."""

    def __init__(self, device: str | Device = "cpu", capacity: int | None = None, name: str = "node",
                 matmul_mode: str = "exact", fuse: bool = True) -> None:
        if matmul_mode not in quant.MODES:
            raise ValueError(f"unknown matmul mode {matmul_mode!r}: expected one of {', '.join(quant.MODES)}")
        self.device = device if isinstance(device, Device) else open_device(device)
        if self.device.is_cpu:
            tune_malloc()
            if matmul_mode != "reference":
                quant.native.load()   # compiled (or loaded from its cache) now, not on the first step
        self.name = name
        self.matmul_mode = matmul_mode
        self.fuse = fuse
        self.memory = Memory(self.device, capacity if capacity is not None else default_capacity())
        self._graphs: dict[str, dict[int, Plan]] = {}
        self._graph_ids = itertools.count(1)
        self._sessions: set[str] = set()
        self._lock = threading.RLock()   # one Compute at a time per node: the kernels use all threads
        self.stats = NodeStats()

    # -- sessions ---------------------------------------------------------------------------------
    def hello(self, protocol_version: int, client_name: str = "") -> pb.HelloReply:
        if protocol_version != PROTOCOL_VERSION:
            raise FailedPrecondition(
                f"protocol version mismatch: client speaks {protocol_version}, node speaks {PROTOCOL_VERSION}")
        session = uuid.uuid4().hex
        with self._lock:
            self._sessions.add(session)
            self._graphs[session] = {}
        log.info("session %s opened by %r", session[:8], client_name[:64])
        return pb.HelloReply(
            protocol_version=PROTOCOL_VERSION, device=self.device.name, node_name=self.name,
            quantized_types=sorted(int(t) for t in SUPPORTED_TYPES), ops=sorted(kernels.OP_ARITY),
            alignment=ALIGNMENT, max_message_bytes=DEFAULT_MAX_MESSAGE, session_id=session)

    def check_session(self, session: str) -> None:
        if session not in self._sessions:
            raise FailedPrecondition("unknown session: call Hello first")

    def close_session(self, session: str) -> None:
        with self._lock:
            if session not in self._sessions:
                return
            self._sessions.discard(session)
            self._graphs.pop(session, None)
            for bid in self.memory.session_buffers(session):
                self.memory.free_buffer(session, bid)
        log.info("session %s closed", session[:8])

    # -- memory -----------------------------------------------------------------------------------
    def get_memory(self) -> tuple[int, int]:
        return self.memory.free, self.memory.capacity

    def alloc_buffer(self, session: str, size: int) -> int:
        self.check_session(session)
        return self.memory.alloc(session, size).id

    def map_buffer(self, session: str, data: np.ndarray) -> int:
        """In process only (never over the network): a read-only buffer over `data` itself."""
        self.check_session(session)
        return self.memory.adopt(session, data).id

    def free_buffer(self, session: str, buffer_id: int) -> None:
        self.check_session(session)
        with self._lock:
            self.memory.free_buffer(session, buffer_id)
            for plan in self._graphs.get(session, {}).values():
                if buffer_id in plan.buffers:
                    plan.alive = False

    def clear_buffer(self, session: str, buffer_id: int, value: int = 0) -> None:
        self.check_session(session)
        with self._lock:
            self.memory.clear(session, buffer_id, value)

    def set_tensor(self, session: str, buffer_id: int, offset: int, data: Any,
                   sha256: bytes = b"") -> None:
        self.check_session(session)
        if sha256 and hashlib.sha256(data).digest() != sha256:
            raise InvalidArgument("set_tensor: the data does not match its sha256")
        with self._lock:
            self.memory.write(session, buffer_id, offset, data)
            if sha256:
                buf = self.memory.get(session, buffer_id)
                buf.digests[offset] = (sha256, len(memoryview(data).cast("B")))
                buf.kind = "weights"

    def fill_from_cache(self, session: str, buffer_id: int, offset: int, size: int, sha256: bytes,
                        cache: TensorCache) -> bool:
        """Bytes [offset, offset+size) from the node's weight cache; False on a miss."""
        self.check_session(session)
        with self._lock:
            buf = self.memory.get(session, buffer_id)
            buf.check_range(offset, size, "set_tensor_from_cache")
            if buf.data is not None and not buf.data.flags.writeable:
                raise InvalidArgument(f"buffer {buffer_id} maps a file read-only: it cannot be written")
            if self.device.is_cpu:
                ok = size > 0 and cache.read_into(sha256, buf.data[offset:offset + size])
            else:
                data = cache.get(sha256, size)
                ok = data is not None
                if ok:
                    buf.data[offset:offset + size] = self.device.to_device(np.frombuffer(data, np.uint8))
            buf.touched(offset, size)
            if ok:
                buf.digests[offset] = (sha256, size)
                buf.kind = "weights"
            self.stats.cache(ok)
            return ok

    def note_digest(self, session: str, buffer_id: int, offset: int, size: int, sha256: bytes) -> None:
        """Record that bytes [offset, offset+size) were verified to hash to `sha256`."""
        with self._lock:
            buf = self.memory.get(session, buffer_id)
            buf.check_range(offset, size, "digest")
            buf.digests[offset] = (sha256, size)
            buf.kind = "weights"

    def get_tensor(self, session: str, buffer_id: int, offset: int, size: int) -> np.ndarray:
        self.check_session(session)
        return self.memory.read(session, buffer_id, offset, size)

    def copy_tensor(self, session: str, src: int, src_off: int, dst: int, dst_off: int, size: int) -> None:
        self.check_session(session)
        with self._lock:
            self.memory.copy(session, src, src_off, dst, dst_off, size)

    # -- graphs -----------------------------------------------------------------------------------
    def register_graph(self, session: str, graph: pb.Graph) -> int:
        self.check_session(session)
        with self._lock:
            graphs = self._graphs.get(session)
            if graphs is None:
                raise FailedPrecondition("the session was closed")
            if len(graphs) >= MAX_GRAPHS_PER_SESSION:
                raise InvalidArgument(f"a session may register at most {MAX_GRAPHS_PER_SESSION} graphs")
            plan = compile_graph(graph, self.memory, session)
            for op in plan.ops:       # the attention caches' buffers hold the KV cache
                if op.type == pb.ATTENTION:
                    for a in op.args[3:5]:
                        self.memory.get(session, plan.tensors[a - len(plan.inputs)].buffer_id).kind = "kv"
            if self.fuse:
                fuse_plan(plan)
            gid = next(self._graph_ids)
            graphs[gid] = plan
            return gid

    def release_graph(self, session: str, graph_id: int) -> None:
        self.check_session(session)
        with self._lock:
            if self._graphs.get(session, {}).pop(graph_id, None) is None:
                raise NotFound(f"no graph {graph_id} in this session")

    def compute(self, session: str, graph_id: int, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_session(session)
        with self._lock:
            plan = self._graphs.get(session, {}).get(graph_id)
            if plan is None:
                raise NotFound(f"no graph {graph_id} in this session")
            t0 = time.perf_counter()
            out = execute(plan, self.memory, session, inputs, self.matmul_mode)
            self.stats.computed(time.perf_counter() - t0)
            return out

    # -- what /metrics reads (rpcserver.metrics) --------------------------------------------------
    @property
    def n_sessions(self) -> int:
        return len(self._sessions)

    def scratch_bytes(self) -> int:
        """Bytes held between Computes outside the buffers: the compiled programs' arenas."""
        total = 0
        for graphs in list(self._graphs.values()):
            for plan in list(graphs.values()):
                total += sum(getattr(p, "arena_bytes", 0) for p in list(plan.programs.values()) if p is not None)
        return total
