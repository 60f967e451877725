"""A node's running counters: what it computed, what it received and sent, what it refused.

Counted where the work happens (`Node.compute`, `Node.fill_from_cache`, the servicer's handlers
and interceptors) and read by `rpcserver.metrics` at scrape time. Increments take a lock of their
own, never the node's: a scrape never waits for a Compute, a Compute never waits for a scrape.
"""
from __future__ import annotations

import threading


class NodeStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.compute_calls = 0
        self.compute_seconds = 0.0
        self.cache_hits = 0            # SetTensorFromCache answered from the weight cache
        self.cache_misses = 0
        self.bytes_received = 0        # SetTensor payloads and Compute inputs
        self.bytes_sent = 0            # GetTensor payloads and Compute outputs
        self.rejected: dict[str, int] = {}   # gRPC status code name -> calls answered with it

    def computed(self, seconds: float) -> None:
        with self._lock:
            self.compute_calls += 1
            self.compute_seconds += seconds

    def cache(self, hit: bool) -> None:
        with self._lock:
            if hit:
                self.cache_hits += 1
            else:
                self.cache_misses += 1

    def moved(self, received: int = 0, sent: int = 0) -> None:
        with self._lock:
            self.bytes_received += received
            self.bytes_sent += sent

    def reject(self, code: str) -> None:
        with self._lock:
            self.rejected[code] = self.rejected.get(code, 0) + 1

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            return {"compute_calls": self.compute_calls, "compute_seconds": self.compute_seconds,
                    "cache_hits": self.cache_hits, "cache_misses": self.cache_misses,
                    "bytes_received": self.bytes_received, "bytes_sent": self.bytes_sent,
                    "rejected": dict(self.rejected)}
