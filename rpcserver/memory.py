"""Device memory: buffers of bytes owned by a session, bounded by the node's capacity.

A buffer is a flat byte array on the device. Tensors are views into it at client-chosen offsets;
every offset and size is checked against the buffer before any byte moves. Each write bumps the
buffer's `generation`. Weights stay in the bytes they were sent as (GGUF blocks): what a buffer
holds is all a node accounts for a tensor. A session's buffers may also count against quotas (its
own, its client's: the servicer's fairness limits), checked with the capacity under one lock.
"""
from __future__ import annotations

import threading
from typing import Any

import numpy as np
from llamarpc.proto.errors import InvalidArgument, NotFound, ResourceExhausted
from llamarpc.proto.types import PLAIN_DTYPES, GGMLType, tensor_nbytes

from .device import Device

ALIGNMENT = 32
MAX_BUFFERS_PER_SESSION = 4096


class Buffer:
    __slots__ = ("id", "size", "data", "generation", "digests", "kind")

    def __init__(self, buffer_id: int, size: int, data: Any) -> None:
        self.id = buffer_id
        self.size = size
        self.data = data  # uint8 device array of `size` bytes
        self.generation = 0
        self.digests: dict[int, tuple[bytes, int]] = {}   # offset -> (sha256, size) of verified contents
        # what it holds, for /metrics: "weights" (bytes verified by their hash, or a mapped file),
        # "kv" (a registered graph's attention caches), else "other"
        self.kind = "other"

    def touched(self, offset: int, size: int) -> None:
        """Bytes [offset, offset+size) changed: forget the content hashes they overlap."""
        self.generation += 1
        for off in [o for o, (_, n) in self.digests.items() if o < offset + size and offset < o + n]:
            del self.digests[off]

    def digest_at(self, offset: int, size: int) -> bytes | None:
        rec = self.digests.get(offset)
        return rec[0] if rec is not None and rec[1] == size else None

    def check_range(self, offset: int, size: int, what: str) -> None:
        if offset < 0 or size < 0 or offset > self.size or size > self.size - offset:
            raise InvalidArgument(
                f"{what}: range [{offset}, {offset}+{size}) is outside buffer {self.id} of {self.size} bytes")


class Quota:
    """Bytes that a group of sessions (one session, or every session of one client) may hold."""

    __slots__ = ("limit", "used", "what")

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.used = 0
        self.what = what   # names the group and the flag that sets the limit, for the error


class Memory:
    """All buffers of a node, with one capacity shared by every session."""

    def __init__(self, device: Device, capacity: int) -> None:
        self.device = device
        self.capacity = capacity
        self._used = 0
        self._next_id = 1
        self._buffers: dict[int, tuple[str, Buffer]] = {}
        self._quotas: dict[str, tuple[Quota, ...]] = {}
        self._lock = threading.Lock()

    # -- accounting -------------------------------------------------------------------------------
    @property
    def used(self) -> int:
        return self._used

    @property
    def free(self) -> int:
        return max(0, self.capacity - self._used)

    def set_quotas(self, session: str, quotas: tuple[Quota, ...]) -> None:
        """The quotas a session's allocations count against from now on (() for none); set them
        before the session allocates, clear them once its buffers are freed."""
        with self._lock:
            if quotas:
                self._quotas[session] = tuple(quotas)
            else:
                self._quotas.pop(session, None)

    def free_for(self, session: str) -> int:
        """What `session` may still allocate: the free capacity, within its quotas."""
        with self._lock:
            return max(0, min([self.capacity - self._used,
                               *(q.limit - q.used for q in self._quotas.get(session, ()))]))

    def _unreserve(self, session: str, size: int) -> None:
        """Give back `size` bytes of `session` (the caller holds the lock)."""
        self._used -= size
        for q in self._quotas.get(session, ()):
            q.used -= size

    # -- buffers ----------------------------------------------------------------------------------
    def _reserve(self, session: str, size: int) -> int:
        """Account `size` bytes for a new buffer of `session`; its id."""
        if size <= 0:
            raise InvalidArgument(f"buffer size must be positive, got {size}")
        with self._lock:
            if size > self.capacity - self.used:
                raise ResourceExhausted(
                    f"cannot allocate {size} bytes: {self.capacity - self.used} free of {self.capacity}")
            quotas = self._quotas.get(session, ())
            for q in quotas:
                if size > q.limit - q.used:
                    raise ResourceExhausted(f"cannot allocate {size} bytes: {q.what} may hold {q.limit} bytes "
                                            f"and holds {q.used}")
            if sum(1 for s, _ in self._buffers.values() if s == session) >= MAX_BUFFERS_PER_SESSION:
                raise ResourceExhausted(f"a session may hold at most {MAX_BUFFERS_PER_SESSION} buffers")
            self._used += size
            for q in quotas:
                q.used += size
            bid = self._next_id
            self._next_id += 1
        return bid

    def _add(self, session: str, buf: Buffer) -> Buffer:
        with self._lock:
            self._buffers[buf.id] = (session, buf)
        return buf

    def alloc(self, session: str, size: int) -> Buffer:
        bid = self._reserve(session, size)
        try:
            data = self.device.lib.zeros(size, dtype=np.uint8)
        except MemoryError:
            with self._lock:
                self._unreserve(session, size)
            raise ResourceExhausted(f"the device could not allocate {size} bytes") from None
        return self._add(session, Buffer(bid, size, data))

    def adopt(self, session: str, data: np.ndarray) -> Buffer:
        """A buffer over existing host bytes (an in-process node's view of a memory-mapped file):
        accounted like any buffer, read-only (a write is INVALID_ARGUMENT)."""
        if not self.device.is_cpu:
            raise InvalidArgument("only a CPU node can use host bytes in place")
        view = data.reshape(-1).view(np.uint8)
        if view.flags.writeable:
            view = view.view()
            view.flags.writeable = False
        buf = Buffer(self._reserve(session, int(view.size)), int(view.size), view)
        buf.kind = "weights"
        return self._add(session, buf)

    def get(self, session: str, buffer_id: int) -> Buffer:
        entry = self._buffers.get(buffer_id)
        if entry is None or entry[0] != session:
            raise NotFound(f"no buffer {buffer_id} in this session")
        return entry[1]

    def free_buffer(self, session: str, buffer_id: int) -> None:
        buf = self.get(session, buffer_id)
        with self._lock:
            if self._buffers.pop(buffer_id, None) is None:
                return   # freed by a concurrent call
            self._unreserve(session, buf.size)
        buf.generation += 1
        buf.data = None

    def bytes_by_kind(self) -> dict[str, tuple[int, int]]:
        """kind -> (buffers, bytes) over every session: a snapshot, no lock held by a Compute."""
        out = {"weights": (0, 0), "kv": (0, 0), "other": (0, 0)}
        with self._lock:
            entries = list(self._buffers.values())
        for _, buf in entries:
            n, b = out.get(buf.kind, (0, 0))
            out[buf.kind] = (n + 1, b + buf.size)
        return out

    def session_buffers(self, session: str) -> list[int]:
        return [bid for bid, (s, _) in list(self._buffers.items()) if s == session]

    # -- bytes ------------------------------------------------------------------------------------
    def write(self, session: str, buffer_id: int, offset: int, data: bytes | memoryview | np.ndarray) -> None:
        buf = self.get(session, buffer_id)
        src = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
        buf.check_range(offset, src.size, "write")
        _writable(buf)
        buf.data[offset:offset + src.size] = self.device.to_device(src)
        buf.touched(offset, src.size)

    def read(self, session: str, buffer_id: int, offset: int, size: int) -> np.ndarray:
        buf = self.get(session, buffer_id)
        buf.check_range(offset, size, "read")
        data = buf.data   # reads take no node lock: the buffer may be freed under us
        if data is None:
            raise NotFound(f"no buffer {buffer_id} in this session")
        return self.device.to_host(data[offset:offset + size])

    def clear(self, session: str, buffer_id: int, value: int) -> None:
        if not 0 <= value <= 255:
            raise InvalidArgument(f"clear value must be a byte (0..255), got {value}")
        buf = self.get(session, buffer_id)
        _writable(buf)
        buf.data[...] = value
        buf.touched(0, buf.size)

    def copy(self, session: str, src_id: int, src_off: int, dst_id: int, dst_off: int, size: int) -> None:
        src = self.get(session, src_id)
        dst = self.get(session, dst_id)
        src.check_range(src_off, size, "copy source")
        dst.check_range(dst_off, size, "copy destination")
        _writable(dst)
        dst.data[dst_off:dst_off + size] = src.data[src_off:src_off + size].copy()
        dst.touched(dst_off, size)
        digest = src.digest_at(src_off, size)
        if digest is not None:
            dst.digests[dst_off] = (digest, size)

    # -- tensor views -----------------------------------------------------------------------------
    def view(self, session: str, buffer_id: int, offset: int, t: GGMLType, shape: tuple[int, ...],
             what: str = "tensor") -> tuple[Buffer, Any]:
        """(buffer, array) for a tensor in a buffer: typed for plain types, raw uint8 rows for
        block-quantized ones ([..., row_bytes])."""
        buf = self.get(session, buffer_id)
        nbytes = tensor_nbytes(t, shape, what)
        if offset % ALIGNMENT:
            raise InvalidArgument(f"{what}: offset {offset} is not a multiple of {ALIGNMENT}")
        buf.check_range(offset, nbytes, what)
        raw = buf.data[offset:offset + nbytes]
        dtype = PLAIN_DTYPES.get(t)
        if dtype is not None:
            return buf, raw.view(dtype).reshape(shape)
        return buf, raw.reshape(tuple(shape[:-1]) + (nbytes // max(1, _rows(shape)),))


def _writable(buf: Buffer) -> None:
    if buf.data is not None and not buf.data.flags.writeable:
        raise InvalidArgument(f"buffer {buf.id} maps a file read-only: it cannot be written")


def _rows(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape[:-1]:
        n *= d
    return n
