"""LocalBackend: an in-process compute node, no network, the same validation as a remote one."""
from __future__ import annotations

import time

import numpy as np
from llamarpc.proto import PROTOCOL_VERSION, pb
from llamarpc.rpcserver.node import Node

from .backend import Backend, NodeInfo


def set_threads(threads: int) -> None:
    """Threads for this process's BLAS and its in-process node's compiled kernels."""
    from llamarpc.rpcserver import quant
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads)
    quant.set_threads(threads)


def _as_bytes(data: np.ndarray | bytes | memoryview) -> memoryview:
    if isinstance(data, np.ndarray):
        return memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
    return memoryview(data)


class LocalBackend(Backend):
    def __init__(self, device: str = "cpu", capacity: int | None = None, node: Node | None = None,
                 matmul_mode: str = "exact") -> None:
        self.node = node or Node(device, capacity, name="local", matmul_mode=matmul_mode)
        self.name = f"local:{self.node.device.name}"
        reply = self.node.hello(PROTOCOL_VERSION, "llamarpc-local")
        self._session = reply.session_id
        self.info = NodeInfo(reply.node_name, reply.device, reply.alignment,
                             frozenset(reply.quantized_types), frozenset(reply.ops))

    def hello(self) -> NodeInfo:
        return self.info

    def get_memory(self) -> tuple[int, int]:
        return self.node.get_memory()

    def map_buffer(self, data: np.ndarray) -> int | None:
        return self.node.map_buffer(self._session, data)

    def alloc_buffer(self, size: int) -> int:
        return self.node.alloc_buffer(self._session, size)

    def free_buffer(self, buffer_id: int) -> None:
        self.node.free_buffer(self._session, buffer_id)

    def clear_buffer(self, buffer_id: int, value: int = 0) -> None:
        self.node.clear_buffer(self._session, buffer_id, value)

    def set_tensor(self, buffer_id: int, offset: int, data: np.ndarray | bytes | memoryview,
                   cache: bool = False) -> int:
        mv = _as_bytes(data)
        self.node.set_tensor(self._session, buffer_id, offset, mv)
        return mv.nbytes

    def get_tensor(self, buffer_id: int, offset: int, size: int) -> bytes:
        return self.node.get_tensor(self._session, buffer_id, offset, size).tobytes()

    def copy_tensor(self, src: int, src_offset: int, dst: int, dst_offset: int, size: int) -> None:
        self.node.copy_tensor(self._session, src, src_offset, dst, dst_offset, size)

    def register_graph(self, graph: pb.Graph) -> int:
        return self.node.register_graph(self._session, graph)

    def compute(self, graph_id: int, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        out = self.node.compute(self._session, graph_id, inputs)
        st = self.stats
        st.compute_calls += 1
        st.compute_seconds += time.perf_counter() - t0
        return out

    def close(self) -> None:
        self.node.close_session(self._session)
