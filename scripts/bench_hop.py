#!/usr/bin/env python3
"""The cost of one gRPC hop per step: a tiny graph (one add over a [1, 576] hidden state, the
shape a decode step ships between nodes) computed N times in process and on a node on 127.0.0.1.

    python scripts/bench_hop.py [-n 500]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from llamarpc.client import GraphBuilder
from llamarpc.client.local import LocalBackend
from llamarpc.client.remote import RemoteBackend
from llamarpc.proto.types import GGMLType


def measure(backend, n: int, width: int) -> list[float]:
    gb = GraphBuilder()
    x = gb.input("hidden", GGMLType.F32, ("n", width))
    gb.output("hidden", gb.add(x, x))
    gid = backend.register_graph(gb.build())
    h = np.ones((1, width), np.float32)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        backend.compute(gid, {"hidden": h})
        times.append(time.perf_counter() - t0)
    return times[n // 10:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=500)
    ap.add_argument("--width", type=int, default=576)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pf = Path(tmp) / "port"
        node = subprocess.Popen([sys.executable, "-m", "llamarpc.rpcserver.cli", "--port", "0", "--port-file",
                                 str(pf), "-t", "1", "--cache-dir", ""], stderr=subprocess.DEVNULL,
                                env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
        try:
            while not (pf.exists() and pf.read_text().strip()):
                time.sleep(0.05)
            time.sleep(0.3)
            local = measure(LocalBackend(), args.n, args.width)
            remote = measure(RemoteBackend(f"127.0.0.1:{pf.read_text().strip()}"), args.n, args.width)
        finally:
            node.terminate()
            node.wait()
    print(f"{'backend':12} {'median ms':>10} {'p90 ms':>8}")
    for name, t in (("in-process", local), ("gRPC node", remote)):
        print(f"{name:12} {statistics.median(t) * 1e3:10.3f} {sorted(t)[int(len(t) * 0.9)] * 1e3:8.3f}")
    print(f"one hop costs {(statistics.median(remote) - statistics.median(local)) * 1e3:.3f} ms per step (median)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
