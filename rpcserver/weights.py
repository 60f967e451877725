"""Float32 device copies of stored weights (the CPU kernels multiply by these).

A copy is made once per distinct content: when the bytes a tensor names were set with a verified
sha256 (SetTensor with a hash, or a hit in the weight cache), the copy is keyed by that hash, its
type and shape, so every session that uploads the same model shares one copy. A copy nobody uses
any more (its frontend left) is retained, so a frontend that comes back is ready at once; retained
copies are counted as free memory and are the first thing reclaimed when memory is needed.
Copies of bytes without a known hash belong to their session and buffer generation only.
"""
from __future__ import annotations

import dataclasses
import itertools
import threading
from typing import Any

import numpy as np
from gguf.quants import dequantize
from llamarpc.proto.types import PLAIN_DTYPES, GGMLType

from .memory import Memory


@dataclasses.dataclass
class _Entry:
    array: Any
    nbytes: int
    generation: int                                  # for session-keyed entries
    users: set[tuple[str, int]] = dataclasses.field(default_factory=set)   # (session, buffer id)
    last_used: int = 0


class WeightCache:
    def __init__(self, memory: Memory) -> None:
        self.memory = memory
        self._entries: dict[tuple, _Entry] = {}
        self._clock = itertools.count()
        self._lock = threading.RLock()
        memory.reclaim = self.reclaim
        memory.reclaimable = self.reclaimable

    def get(self, session: str, ts: Any) -> Any:
        """The float32 array for tensor spec `ts` (buffer_id, offset, type, shape)."""
        buf, raw = self.memory.view(session, ts.buffer_id, ts.offset, ts.type, ts.shape)
        if ts.type == GGMLType.F32:
            return raw
        digest = buf.digest_at(ts.offset, int(raw.nbytes))
        key = ("content", digest, ts.type, ts.shape) if digest else ("session", session, ts)
        user = (session, ts.buffer_id)
        with self._lock:
            e = self._entries.get(key)
            if e is not None and (digest or e.generation == buf.generation):
                e.users.add(user)
                e.last_used = next(self._clock)
                return e.array
            if e is not None:
                self._remove(key)
        dev = self.memory.device
        host = dev.to_host(raw)
        arr = host.astype(np.float32) if ts.type in PLAIN_DTYPES else dequantize(host, ts.type)
        arr = dev.to_device(np.ascontiguousarray(arr.reshape(ts.shape)))
        with self._lock:
            self.memory.reserve_extra(repr(key), arr.nbytes)
            self._entries[key] = _Entry(arr, arr.nbytes, buf.generation, {user}, next(self._clock))
        return arr

    def _remove(self, key: tuple) -> None:
        self._entries.pop(key, None)
        self.memory.release_extra(repr(key))

    def _drop_users(self, match: Any) -> None:
        with self._lock:
            for key, e in list(self._entries.items()):
                e.users = {u for u in e.users if not match(u)}
                if not e.users and key[0] == "session":
                    self._remove(key)

    def drop_buffer(self, session: str, buffer_id: int) -> None:
        self._drop_users(lambda u: u == (session, buffer_id))

    def drop_session(self, session: str) -> None:
        self._drop_users(lambda u: u[0] == session)

    def reclaimable(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values() if not e.users)

    def reclaim(self, nbytes: int) -> int:
        """Free retained copies (least recently used first) until `nbytes` are freed."""
        freed = 0
        with self._lock:
            idle = sorted((e.last_used, k) for k, e in self._entries.items() if not e.users)
            for _, key in idle:
                if freed >= nbytes:
                    break
                freed += self._entries[key].nbytes
                self._remove(key)
        return freed
