#!/usr/bin/env python3
"""Embedding throughput over HTTP beside llama-server, same GGUF, same settings, and how close the
two servers' vectors are.

    .venv/bin/python scripts/bench_embed_peer.py [-m models/SmolLM2-135M-Instruct.Q4_1.gguf] [-t 2] \\
        [--llama-bin /root/llamacpp/build/bin] [--seconds 10] [--batches 1,8,64]

Each server runs alone (`llamarpc ... --embeddings --pooling mean` then `llama-server ... --embeddings
--pooling mean --no-repack`, -c 4096 -np 1 -t T on 127.0.0.1). For each batch size B, one client sends
POST /v1/embeddings with B different ~9-token inputs, back to back, for --seconds; inputs/s is the
inputs answered over the wall clock. Then the first batch's vectors of the two servers are compared
(cosine similarity; both are L2-normalized). Run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
WORDS = ["river", "mountain", "engine", "violin", "garden", "comet", "harbor", "lantern", "meadow", "glacier"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def texts(n: int) -> list[str]:
    return [f"A short note about the {WORDS[i % len(WORDS)]} number {i}." for i in range(n)]


def start(cmd: list[str], url: str, env: dict, log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:      # a file, not a pipe: a server's per-request log must never block it
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=f, env=env)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120:
        if p.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited {p.returncode}: {log.read_text(errors='replace')[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return p
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    p.kill()
    raise RuntimeError(f"{cmd[0]} not ready in 120 s")


def measure(url: str, batches: list[int], seconds: float) -> tuple[dict[int, float], np.ndarray]:
    rates: dict[int, float] = {}
    first = None
    with httpx.Client(base_url=url, timeout=120) as c:
        c.post("/v1/embeddings", json={"input": texts(2)}).raise_for_status()     # warm-up
        for b in batches:
            inputs, n, t0 = texts(b), 0, time.monotonic()
            while time.monotonic() - t0 < seconds:
                r = c.post("/v1/embeddings", json={"input": inputs})
                r.raise_for_status()
                data = r.json()["data"]
                if first is None:
                    first = np.array([d["embedding"] for d in sorted(data, key=lambda d: d["index"])], np.float64)
                n += len(data)
            rates[b] = n / (time.monotonic() - t0)
    assert first is not None
    return rates, first


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=str(ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--llama-bin", default="/root/llamacpp/build/bin")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--batches", default="1,8,64")
    a = ap.parse_args()
    batches = [int(x) for x in a.batches.split(",")]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "OPENBLAS_NUM_THREADS": str(a.threads)}
    common = ["-m", a.model, "--embeddings", "--pooling", "mean", "-c", "4096", "-np", "1", "-t", str(a.threads),
              "--host", HOST]
    results = {}
    for name, exe in (("llamarpc", [sys.executable, "-m", "llamarpc.frontend.cli"]),
                      ("llama-server", [str(Path(a.llama_bin) / "llama-server"), "--no-repack"])):
        port = free_port()
        url = f"http://{HOST}:{port}"
        with tempfile.TemporaryDirectory() as tmp:
            p = start([*exe, *common, "--port", str(port)], url, env, Path(tmp) / "server.log")
            try:
                results[name] = measure(url, batches, a.seconds)
            finally:
                p.terminate()
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
    ours, peer = results["llamarpc"], results["llama-server"]
    print(f"{Path(a.model).name}, pooling mean, -t {a.threads}, ~9-token inputs, one client, {a.seconds:.0f} s per row")
    print(f"{'batch':>6} {'llamarpc in/s':>14} {'llama-server in/s':>18} {'ratio':>7}")
    for b in batches:
        print(f"{b:>6} {ours[0][b]:>14.1f} {peer[0][b]:>18.1f} {ours[0][b] / peer[0][b]:>6.2f}x")
    cos = np.sum(ours[1] * peer[1], axis=1) / (np.linalg.norm(ours[1], axis=1) * np.linalg.norm(peer[1], axis=1))
    print(f"vectors of the first batch: cosine similarity min {cos.min():.6f}, max |diff| "
          f"{np.abs(ours[1] - peer[1]).max():.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
