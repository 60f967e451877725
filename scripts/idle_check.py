#!/usr/bin/env python
"""A frontend over two nodes idles, then serves: every request must succeed with no re-attach.

Issue 10's measurement: with the old keepalive rules an idle frontend lost its node sessions after
45-95 s (GOAWAY too_many_pings), and the next requests got 503 and a re-attach. This runs the real
defaults (frontend pings every 5 s, nodes accept a ping a second and ping every 10 s), on 127.0.0.1:

    python scripts/idle_check.py [--idle 100] [--requests 5] [-m models/SmolLM2-135M-Instruct.Q4_1.gguf]

Prints one row per phase (HTTP status, seconds, sessions each node has opened); exits 1 if a
request failed or a node saw a second session. tests/test_node_fairness.py runs the same check
with 2 s keepalives and 8 s of idling.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from nodeproc import start_node  # noqa: E402
from serverproc import start_server  # noqa: E402


def sessions_opened(stderr: str) -> int:
    return sum(1 for line in stderr.splitlines() if " opened by " in line)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--idle", type=float, default=100.0, help="seconds without a request (default 100)")
    ap.add_argument("--requests", type=int, default=5, help="requests after the idle time (default 5)")
    args = ap.parse_args()
    if not Path(args.model).exists():
        print(f"{args.model} is absent: run scripts/get-model.sh", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="idle-check-"))
    nodes = [start_node(tmp), start_node(tmp)]
    srv = None
    rows: list[tuple[str, str, float, str]] = []
    ok = True
    try:
        srv, url = start_server(["-m", args.model, "--rpc", ",".join(n.address for n in nodes), "-c", "1024",
                                 "-np", "2", "-t", "1"])
        body = {"prompt": "The capital of France is", "n_predict": 16, "temperature": 0}

        def request(phase: str) -> None:
            nonlocal ok
            t0 = time.perf_counter()
            try:
                r = httpx.post(f"{url}/completion", json=body, timeout=120)
                status = str(r.status_code)
                ok &= r.status_code == 200
            except httpx.HTTPError as e:
                status = type(e).__name__
                ok = False
            opened = "/".join(str(sessions_opened(n.stderr_text())) for n in nodes)
            rows.append((phase, status, time.perf_counter() - t0, opened))

        request("before idle")
        print(f"idling {args.idle:.0f} s ...", flush=True)
        time.sleep(args.idle)
        for i in range(args.requests):
            request(f"after idle #{i + 1}")
        health = httpx.get(f"{url}/health", timeout=10).status_code
    finally:
        if srv is not None:
            srv.stop()
        for n in nodes:
            n.stop()
    print(f"{'phase':<16} {'status':>6} {'seconds':>8} {'sessions opened (node 1/2)':>28}")
    for phase, status, dt, opened in rows:
        print(f"{phase:<16} {status:>6} {dt:>8.2f} {opened:>28}")
    reattached = any(opened != "1/1" for *_, opened in rows)
    print(f"/health {health}; {'no re-attach' if not reattached else 'a node session was re-opened'}")
    return 0 if ok and not reattached and health == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
