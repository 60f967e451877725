"""The one interface the frontend computes through, whatever is behind it."""
from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable

import numpy as np
from llamarpc.proto import pb


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    name: str
    device: str
    alignment: int
    quantized_types: frozenset[int]
    ops: frozenset[int]


@dataclasses.dataclass
class BackendStats:
    """What this frontend did with one node, counted where each call is made (for /metrics)."""

    compute_calls: int = 0
    compute_seconds: float = 0.0     # as the node measured it (a remote node reports it per Compute)
    bytes_sent: int = 0              # tensor data and Compute requests
    bytes_received: int = 0          # tensor data and Compute replies
    cache_hits: int = 0              # weights the node had in its cache (SetTensorFromCache hits)
    cache_misses: int = 0
    reattaches: int = 0              # new sessions after the node was lost (the pipeline counts them)


class Pending:
    """A Compute under way (or done): `result()` returns its outputs or raises its error."""

    def __init__(self, value: dict[str, np.ndarray] | None = None, error: BaseException | None = None,
                 wait: Callable[[], dict[str, np.ndarray]] | None = None) -> None:
        self._value, self._error, self._wait = value, error, wait

    def result(self) -> dict[str, np.ndarray]:
        if self._wait is not None:
            self._value, self._wait = self._wait(), None
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


class Backend(abc.ABC):
    """A compute node seen from the frontend: buffers, tensors, graphs.

    Errors are the classes of ``llamarpc.proto.errors``; a node that does not answer raises
    ``NodeUnavailable`` naming the node.
    """

    name: str = "backend"

    @property
    def stats(self) -> BackendStats:
        """This backend's counters, made on first use."""
        st = self.__dict__.get("_stats")
        if st is None:
            st = self.__dict__["_stats"] = BackendStats()
        return st

    @abc.abstractmethod
    def hello(self) -> NodeInfo: ...

    @abc.abstractmethod
    def get_memory(self) -> tuple[int, int]:
        """(free, total) bytes."""

    def map_buffer(self, data: np.ndarray) -> int | None:
        """A read-only buffer over bytes this process already holds (a memory-mapped GGUF), with
        no copy; None where the backend cannot (a remote node: the bytes must travel)."""
        return None

    @abc.abstractmethod
    def alloc_buffer(self, size: int) -> int: ...

    @abc.abstractmethod
    def free_buffer(self, buffer_id: int) -> None: ...

    @abc.abstractmethod
    def clear_buffer(self, buffer_id: int, value: int = 0) -> None: ...

    @abc.abstractmethod
    def set_tensor(self, buffer_id: int, offset: int, data: np.ndarray | bytes | memoryview,
                   cache: bool = False) -> int:
        """Write bytes at `offset`; with `cache`, weights may come from the node's cache.
        Returns the number of bytes actually sent."""

    def set_tensors(self, items: list[tuple[int, int, np.ndarray]], cache: bool = False,
                    progress: Callable[[int], None] | None = None,
                    digests: list[bytes] | None = None) -> int:
        """Write many (buffer_id, offset, data) at once; returns the bytes actually sent.
        `progress(nbytes)` is called as each item is done; `digests` are the items' sha256 when
        the caller already knows them."""
        sent = 0
        for buffer_id, offset, data in items:
            sent += self.set_tensor(buffer_id, offset, data, cache=cache)
            if progress:
                progress(int(np.asarray(data).nbytes))
        return sent

    @abc.abstractmethod
    def get_tensor(self, buffer_id: int, offset: int, size: int) -> bytes: ...

    @abc.abstractmethod
    def copy_tensor(self, src: int, src_offset: int, dst: int, dst_offset: int, size: int) -> None: ...

    @abc.abstractmethod
    def register_graph(self, graph: pb.Graph) -> int: ...

    @abc.abstractmethod
    def compute(self, graph_id: int, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def compute_async(self, graph_id: int, inputs: dict[str, np.ndarray]) -> Pending:
        """Start a Compute; `.result()` waits for it. Backends that cannot overlap calls (in
        process) compute at once."""
        try:
            return Pending(value=self.compute(graph_id, inputs))
        except Exception as e:  # noqa: BLE001 - handed to result()
            return Pending(error=e)

    @property
    def alive(self) -> bool:
        """False once the node is known to have gone (its session ended)."""
        return True

    def reconnect(self) -> NodeInfo:
        """Open a new session (after the node was lost); earlier buffers and graphs are gone."""
        return self.hello()

    def close(self) -> None:  # noqa: B027 - optional
        pass

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
