#!/usr/bin/env python
"""Soak: thousands of short requests against a frontend over two nodes, with clients that hang up
mid-stream and a node restarted (kill -9, back 2 s later) every few hundred requests; the RSS of
every process is sampled and printed as a curve (bounded is the bar: issue 10).

    python scripts/soak.py [--requests 3000] [--concurrency 4] [--restart-every 300]
                           [--disconnect 0.2] [--n-predict 8] [--sample-every 100] [-m MODEL]

All on 127.0.0.1: two llamarpc-server processes (tests/nodeproc.py) and the `llamarpc` server CLI
as a subprocess (-np = concurrency). Each request is a /completion with a random short prompt;
a fraction (--disconnect) is streamed and dropped after its first token. Prints a row every
--sample-every requests (requests done, outcomes so far, RSS MiB of the frontend and each node)
and the totals; exits 1 if a request that was not dropped failed.
"""
from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from nodeproc import start_node  # noqa: E402
from serverproc import free_port  # noqa: E402

WORDS = "the a of sea light river stone copper bird city night old green small quiet road".split()


def start_frontend(argv: list[str], log_path: Path) -> tuple[subprocess.Popen, str]:
    """The `llamarpc` server CLI in a subprocess, its log in a file; waits for /health 200."""
    port = free_port()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "llamarpc.frontend.cli", *argv, "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the frontend exited: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the frontend did not become healthy")


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ok = self.dropped = self.failed = 0
        self.errors: dict[str, int] = {}

    def add(self, kind: str, err: str = "") -> None:
        with self.lock:
            setattr(self, kind, getattr(self, kind) + 1)
            if err:
                self.errors[err[:120]] = self.errors.get(err[:120], 0) + 1


def one(client: httpx.Client, rng: random.Random, a: argparse.Namespace, counts: Counts) -> None:
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
    body = {"prompt": prompt, "n_predict": a.n_predict, "temperature": 0, "cache_prompt": rng.random() < 0.5}
    try:
        if rng.random() < a.disconnect:
            with client.stream("POST", "/completion", json={**body, "stream": True}) as s:
                for line in s.iter_lines():
                    if line.startswith("data: "):
                        break               # hang up after the first event
            counts.add("dropped")
            return
        r = client.post("/completion", json=body)
        if r.status_code == 200 and "content" in r.json():
            counts.add("ok")
        else:
            counts.add("failed", f"{r.status_code} {r.text}")
    except httpx.HTTPError as e:
        counts.add("failed", f"{type(e).__name__}: {e}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--restart-every", type=int, default=300)
    ap.add_argument("--disconnect", type=float, default=0.2, help="fraction of requests dropped mid-stream")
    ap.add_argument("--n-predict", type=int, default=8)
    ap.add_argument("--sample-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    # a restarted node may compile its kernels first (a changed kernels.c): give it time
    nodes = [start_node(tmp, ready_timeout=180), start_node(tmp, ready_timeout=180)]
    proc = None
    counts = Counts()
    try:
        proc, url = start_frontend(["-m", a.model, "-c", str(512 * a.concurrency), "-np", str(a.concurrency),
                                    "--rpc", ",".join(n.address for n in nodes), "--node-grace", "120", "--metrics"],
                                   tmp / "frontend.log")
        head = f"{'requests':>8}  {'ok':>6}  {'dropped':>7}  {'failed':>6}  {'frontend MiB':>12}  " + "  ".join(
            f"{'node' + str(i) + ' MiB':>9}" for i in range(len(nodes)))
        print(head, flush=True)
        rngs = [random.Random(a.seed * 1000 + i) for i in range(a.requests)]
        done = [0]
        lock = threading.Lock()
        restarts = 0

        def sample() -> None:
            print(f"{done[0]:>8}  {counts.ok:>6}  {counts.dropped:>7}  {counts.failed:>6}  {rss_mib(proc.pid):>12.1f}  "
                  + "  ".join(f"{rss_mib(n.pid):>9.1f}" for n in nodes), flush=True)

        sample()
        with httpx.Client(base_url=url, timeout=120) as client, ThreadPoolExecutor(a.concurrency) as pool:
            def job(i: int) -> None:
                one(client, rngs[i], a, counts)
                with lock:
                    done[0] += 1
                    if done[0] % a.sample_every == 0:
                        sample()

            batch = max(a.restart_every, 1)
            for start in range(0, a.requests, batch):
                futs = [pool.submit(job, i) for i in range(start, min(start + batch, a.requests))]
                if start + batch < a.requests:
                    # mid-batch: once half of it is done, kill -9 a node and bring it back 2 s later
                    while sum(f.done() for f in futs) < len(futs) // 2:
                        time.sleep(0.05)
                    victim = nodes[restarts % len(nodes)]
                    victim.kill9()
                    threading.Timer(2.0, victim.restart).start()
                    restarts += 1
                for f in futs:
                    f.result()
            metrics = client.get("/metrics").text
        if done[0] % a.sample_every:
            sample()
        keep = ("node_losses_total", "node_reattached_total", "layer_replacements_total",
                "replayed_tokens_total", "streams_resumed_total",
                "streams_failed_total")
        print(f"total: {a.requests} requests, {counts.ok} ok, {counts.dropped} dropped by the client, "
              f"{counts.failed} failed; {restarts} node restarts; "
              + ", ".join(line.split(":", 1)[1] for line in metrics.splitlines()
                          if line.startswith("llamarpc:") and line.split()[0].split(":", 1)[1] in keep))
        for err, n in sorted(counts.errors.items(), key=lambda kv: -kv[1]):
            print(f"  {n} x {err}")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(20)
        for n in nodes:
            n.stop()
    return 1 if counts.failed else 0


if __name__ == "__main__":
    sys.exit(main())
