#!/usr/bin/env python3
"""`n` > 1 against n separate requests: one prefill whose KV cells are copied to the other choices'
sequences, against n prefills of the same prompt.

    .venv/bin/python scripts/bench_choices.py [-m models/SmolLM2-135M-Instruct.Q4_1.gguf] [-n 3] [-t 2] [--rounds 3]

Starts `llamarpc -np N -c 8192 -t T` on 127.0.0.1, then per round (alternating): one POST
/v1/completions with `n: N`, and N concurrent requests with `n: 1`, the same ~400-token prompt,
`max_tokens` 8, greedy, `cache_prompt: false`. Prints the median wall clock of each and their ratio,
and checks that the greedy texts agree. Run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
PROMPT = " ".join(f"Item {i}: a crate of apples, pears and plums was loaded onto the cart." for i in range(25))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=str(ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("-n", type=int, default=3)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    url = f"http://{HOST}:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "OPENBLAS_NUM_THREADS": str(a.threads)}
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "cache_prompt": False}
    with tempfile.TemporaryFile() as log:
        p = subprocess.Popen([sys.executable, "-m", "llamarpc.frontend.cli", "-m", a.model, "-np", str(a.n), "-c", "8192",
                              "-t", str(a.threads), "--host", HOST, "--port", str(port)], stdout=log, stderr=log, env=env)
        try:
            for _ in range(600):
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if p.poll() is not None:
                    raise RuntimeError("the server exited")
                time.sleep(0.2)
            with httpx.Client(base_url=url, timeout=300) as c:
                usage = c.post("/v1/completions", json={**body, "max_tokens": 1}).json()["usage"]
                together, apart, texts = [], [], set()
                for _ in range(a.rounds):
                    t0 = time.perf_counter()
                    r = c.post("/v1/completions", json={**body, "n": a.n}).json()
                    together.append(time.perf_counter() - t0)
                    texts |= {ch["text"] for ch in r["choices"]}
                    outs: list[str] = []

                    def one(outs: list[str] = outs) -> None:
                        outs.append(httpx.post(url + "/v1/completions", json=body, timeout=300).json()["choices"][0]["text"])

                    ts = [threading.Thread(target=one) for _ in range(a.n)]
                    t0 = time.perf_counter()
                    for t in ts:
                        t.start()
                    for t in ts:
                        t.join()
                    apart.append(time.perf_counter() - t0)
                    texts |= set(outs)
        finally:
            p.terminate()
            p.wait(30)
    mt, ma = statistics.median(together), statistics.median(apart)
    print(f"{Path(a.model).name}, -np {a.n} -t {a.threads}, a {usage['prompt_tokens']}-token prompt, 8 tokens each, "
          f"greedy, {a.rounds} rounds")
    print(f"one request with n={a.n}: {mt:.2f} s; {a.n} concurrent requests with n=1: {ma:.2f} s; "
          f"{ma / mt:.2f}x faster; greedy texts {'all equal' if len(texts) == 1 else 'DIFFER'}")
    return 0 if len(texts) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
