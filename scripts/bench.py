#!/usr/bin/env python3
"""llamarpc beside llama.cpp (llama-server, ggml-rpc-server), same GGUF, same settings, one table.

    .venv/bin/python scripts/bench.py [-m models/SmolLM2-135M-Instruct.Q4_1.gguf] [-t 2] \\
        [--llama-bin /root/llamacpp/build/bin] [--only a,b,c] [--rounds 3] [--n-predict 128] [--ours-only]

Configurations (each server with -np 8 -c 8192 -t T on 127.0.0.1):
  (a) in process: `llamarpc -m M` vs `llama-server -m M`;
  (b) two nodes on loopback: 2x `llamarpc-server -t 1` + `llamarpc --rpc A,B` vs
      2x `ggml-rpc-server -t 1 -c` + `llama-server --rpc A,B -ngl 99`;
  (c) as (b), each node behind scripts/netdelay.py (1 ms each way, 1 Gbit/s each way per node link).

Each round starts the configuration's processes afresh, measures, reads every process's peak RSS
(VmHWM of it and its children, before it is stopped) and stops them; rounds alternate ours, peer,
ours, peer, ... per configuration, and the table shows medians. Measured with one client for both,
llama.cpp's native streamed POST /completion (greedy, ignore_eos, cache_prompt false), after a
4-token warm-up request:
  - prefill tok/s: one ~300-token prompt (n_predict 1): the server's timings.prompt_per_second
    (fallback: prompt tokens / time to first streamed token);
  - decode tok/s, 1 stream: n_predict tokens after a short prompt: timings.predicted_per_second
    (fallback: streamed tokens after the first / time from first to last);
  - decode tok/s, 8 streams: 8 different short prompts sent at once; wall clock, not timings:
    sum of (tokens_predicted - 1) / (last stream's end - first stream's first token);
  - time to ready: the server process's start -> first GET /health 200 (for (b)/(c) the nodes are
    already listening; their own start -> listening is its own row). Nodes keep their weight cache
    (ours --cache-dir, llama.cpp's -c with LLAMA_CACHE) in a temp dir per configuration, reused
    across rounds: round 1 is a cold start, later rounds warm; both are shown;
  - peak RSS MiB: frontend + each node (the proxies are not counted).
Ratios are llamarpc / llama.cpp (above 1 is better for tok/s, worse for seconds and MiB).
OPENBLAS_NUM_THREADS / OMP_NUM_THREADS are T for our frontend, 1 for our nodes. Every process this
starts is stopped at the end of its round (the server before its nodes: llama-server aborts when its
RPC nodes vanish first), on error and on Ctrl-C/SIGTERM; it only ever uses 127.0.0.1.
If llama-server dies of SIGILL (its AMX kernels, on a CPU that lists AMX where the kernel/VM does not
enable it), the round is rerun with --no-repack and the table says so; --peer-args adds flags by hand.
Use --json FILE for every round's raw numbers, --logs DIR to keep the servers' logs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
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
CONFIGS = {"a": "(a) in process", "b": "(b) 2 nodes, loopback", "c": "(c) 2 nodes, 1 ms + 1 Gbit/s each way"}
SYSTEMS = ("ours", "peer")
STORY = "Once upon a time, in a small village at the edge of a great forest, there lived"
STREAM_PROMPTS = [f"Here is a short story about {w}. Once upon a time," for w in
                  ("a cat", "a dragon", "the sea", "a robot", "a baker", "the moon", "a violin", "a mountain",
                   "a lighthouse", "a river", "a clock", "a garden", "a train", "a fox", "a storm", "a king")]
_WORDS = ("harbor lantern river meadow engine violin orchard glacier market library canyon festival "
          "compass tunnel bakery island archive thunder signal garden").split()
LONG_TEXT = " ".join(
    f"Note {i}: the {_WORDS[i % 20]} near the {_WORDS[(3 * i + 7) % 20]} was checked on day {i * 7 % 31 + 1}, "
    f"and the {_WORDS[(5 * i + 2) % 20]} report says {i * 13 % 97} items were moved." for i in range(60))

PROCS: list[subprocess.Popen] = []      # everything this script started, for the final sweep


# -- processes ----------------------------------------------------------------------------------------
def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with log.open("ab") as f:
        f.write(f"\n$ {' '.join(cmd)}\n".encode())
        f.flush()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                             env={**os.environ, **(env or {})}, start_new_session=True)
    p.log = log  # type: ignore[attr-defined]
    PROCS.append(p)
    return p


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each one's own process group (it was started in a new session), then SIGKILL."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 15
    for p in live:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)     # also any child left in its group
        except (ProcessLookupError, PermissionError):
            pass
        if p.poll() is None:
            p.wait(10)


def log_tail(p: subprocess.Popen, n: int = 25) -> str:
    try:
        lines = Path(p.log).read_text(errors="replace").splitlines()  # type: ignore[attr-defined]
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def died(p: subprocess.Popen, what: str) -> RuntimeError:
    return RuntimeError(f"{what} exited with {p.returncode}; last lines of {p.log}:\n{log_tail(p)}")  # type: ignore[attr-defined]


def wait_listening(port: int, p: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise died(p, what)
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{what} did not listen on {HOST}:{port} within {timeout:.0f} s")


def wait_port_file(path: Path, p: subprocess.Popen, what: str, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise died(p, what)
        if path.exists() and path.read_text().strip():
            return int(path.read_text())
        time.sleep(0.02)
    raise RuntimeError(f"{what} wrote no port file within {timeout:.0f} s")


def wait_health(url: str, p: subprocess.Popen, what: str, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=5) as c:
        while time.monotonic() < deadline:
            if p.poll() is not None:
                raise died(p, what)
            try:
                if c.get(url + "/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    raise RuntimeError(f"{what} not healthy within {timeout:.0f} s")


def peak_rss_mib(pid: int) -> float:
    """VmHWM of pid plus that of its descendants (MiB)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    total, todo = 0.0, [pid]
    while todo:
        q = todo.pop()
        todo.extend(children.get(q, []))
        try:
            for line in Path(f"/proc/{q}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


# -- the client ---------------------------------------------------------------------------------------
def complete(url: str, prompt: str, n: int) -> dict:
    """One streamed /completion; the send time, first and last chunk times, counts, timings, text."""
    body = {"prompt": prompt, "n_predict": n, "ignore_eos": True, "temperature": 0, "stream": True,
            "cache_prompt": False}
    t0 = time.perf_counter()
    t_first = None
    final: dict | None = None
    text: list[str] = []
    with httpx.stream("POST", url + "/completion", json=body, timeout=900) as r:
        if r.status_code != 200:
            raise RuntimeError(f"POST {url}/completion: {r.status_code} {r.read()[:500]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                raise RuntimeError(f"POST {url}/completion: {ev['error']}")
            now = time.perf_counter()
            if t_first is None:
                t_first = now
            text.append(ev.get("content") or "")
            if ev.get("stop"):
                final = ev
                break
    t_end = time.perf_counter()
    if final is None or t_first is None:
        raise RuntimeError(f"POST {url}/completion: the stream ended without a final chunk")
    return {"t0": t0, "t_first": t_first, "t_end": t_end, "n": final.get("tokens_predicted", 0),
            "n_prompt": final.get("tokens_evaluated", 0), "timings": final.get("timings") or {}, "text": "".join(text)}


def make_prompt(url: str, n_tokens: int) -> tuple[str, int]:
    ids = httpx.post(url + "/tokenize", json={"content": LONG_TEXT}, timeout=60).json()["tokens"]
    if len(ids) <= n_tokens:
        return LONG_TEXT, len(ids)
    text = httpx.post(url + "/detokenize", json={"tokens": ids[:n_tokens]}, timeout=60).json()["content"]
    return text.strip(), n_tokens


def measure(url: str, ctx: argparse.Namespace) -> dict:
    complete(url, "Hello", 4)                                   # warm-up
    if ctx.prompt is None:
        ctx.prompt, _ = make_prompt(url, ctx.prompt_tokens)
    pre = complete(url, ctx.prompt, 1)
    pt = pre["timings"]
    prefill_src = "timings" if pt.get("prompt_per_second") else "ttft"
    prefill = pt["prompt_per_second"] if prefill_src == "timings" else pre["n_prompt"] / (pre["t_first"] - pre["t0"])
    one = complete(url, STORY, ctx.n_predict)
    ot = one["timings"]
    decode_src = "timings" if ot.get("predicted_per_second") else "stream"
    decode = (ot["predicted_per_second"] if decode_src == "timings"
              else (one["n"] - 1) / max(one["t_end"] - one["t_first"], 1e-9))
    results: list[dict] = [{} for _ in range(ctx.streams)]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = complete(url, STREAM_PROMPTS[i % len(STREAM_PROMPTS)], ctx.n_predict)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(ctx.streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    span = max(r["t_end"] for r in results) - min(r["t_first"] for r in results)
    agg = sum(r["n"] - 1 for r in results) / max(span, 1e-9)
    return {"prefill": prefill, "prefill_src": prefill_src, "prompt_n": pt.get("prompt_n") or pre["n_prompt"],
            "prompt_cached": pt.get("cache_n", 0), "decode1": decode, "decode1_src": decode_src, "decode1_n": one["n"],
            "decode_agg": agg, "agg_sum_timings": sum(r["timings"].get("predicted_per_second", 0.0) for r in results),
            "ttft_max_agg": max(r["t_first"] - r["t0"] for r in results), "text": one["text"]}


class IllegalInstruction(Exception):
    """llama-server died of SIGILL: its AMX kernels on a CPU whose kernel/VM does not enable AMX."""


# -- one round of one configuration -----------------------------------------------------------------
def run_round(cfg: str, system: str, rnd: int, ctx: argparse.Namespace) -> dict:
    tag = f"{cfg}-{system}"
    logs: Path = ctx.logs
    procs: list[subprocess.Popen] = []
    nodes: list[subprocess.Popen] = []
    out: dict = {"config": cfg, "system": system, "round": rnd}
    try:
        addrs: list[str] = []
        if cfg in ("b", "c"):
            ports = free_ports(2)
            t0 = time.perf_counter()
            for i, port in enumerate(ports):
                cache = ctx.tmp / f"cache-{tag}-{i}"
                cache.mkdir(exist_ok=True)
                if system == "ours":
                    cmd = [ctx.ours_node, "--host", HOST, "--port", str(port), "-t", "1", "--cache-dir", str(cache)]
                    env = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
                else:
                    cmd = [str(ctx.llama_bin / "ggml-rpc-server"), "-H", HOST, "-p", str(port), "-t", "1", "-c"]
                    env = {"LLAMA_CACHE": str(cache)}
                nodes.append(start(cmd, logs / f"{tag}-node{i}.log", env))
            procs += nodes
            for i, (port, p) in enumerate(zip(ports, nodes)):
                wait_listening(port, p, f"{tag} node {i}")
            out["node_ready"] = time.perf_counter() - t0
            if cfg == "c":
                for i, port in enumerate(ports):
                    pf = ctx.tmp / f"proxy-{tag}-{rnd}-{i}.port"
                    px = start([sys.executable, str(ROOT / "scripts" / "netdelay.py"), "--target", str(port),
                                "--port-file", str(pf), "--delay-ms", str(ctx.delay_ms), "--rate-mbit",
                                str(ctx.rate_mbit)], logs / f"{tag}-proxy{i}.log")
                    procs.append(px)
                    ports[i] = wait_port_file(pf, px, f"netdelay for node {i}")
            addrs = [f"{HOST}:{port}" for port in ports]
        port = free_ports(1)[0]
        common = ["-m", ctx.model, "-np", str(ctx.parallel), "-c", str(ctx.ctx_size), "-t", str(ctx.threads),
                  "--host", HOST, "--port", str(port)]
        if system == "ours":
            cmd = [ctx.ours_frontend, *common, *ctx.ours_args] + (["--rpc", ",".join(addrs)] if addrs else [])
            env = {"OPENBLAS_NUM_THREADS": str(ctx.threads), "OMP_NUM_THREADS": str(ctx.threads)}
        else:
            cmd = [str(ctx.llama_bin / "llama-server"), *common, *ctx.peer_args] + (
                ["--rpc", ",".join(addrs), "-ngl", "99"] if addrs else [])
            env = {}
        url = f"http://{HOST}:{port}"
        t0 = time.perf_counter()
        fe = start(cmd, logs / f"{tag}-server.log", env)
        procs.append(fe)
        try:
            wait_health(url, fe, f"{tag} server")
        except RuntimeError:
            if system == "peer" and fe.returncode == -signal.SIGILL and "--no-repack" not in ctx.peer_args:
                raise IllegalInstruction from None
            raise
        out["ready"] = time.perf_counter() - t0
        out.update(measure(url, ctx))
        for p in [fe, *nodes]:
            if p.poll() is not None:
                raise died(p, tag)
        out["rss"] = [peak_rss_mib(p.pid) for p in [fe, *nodes]]     # frontend, node 0, node 1
    finally:
        for p in reversed(procs):       # the server first, then proxies and nodes (llama-server dies without its nodes)
            stop([p])
    return out


# -- the table ----------------------------------------------------------------------------------------
def med(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def fmt(v: float | None, digits: int) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None or not b else f"{a / b:.2f}×"


def common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def table(res: dict[str, dict[str, list[dict]]], ctx: argparse.Namespace) -> str:
    lines = ["| configuration | metric | llamarpc | llama.cpp | llamarpc / llama.cpp |", "|---|---|---:|---:|---:|"]
    notes = []
    for cfg, by_sys in res.items():
        rows = []
        ours, peer = by_sys.get("ours", []), by_sys.get("peer", [])
        prompt_n = med(ours or peer, "prompt_n")
        rows.append((f"prefill tok/s ({prompt_n:.0f}-token prompt)" if prompt_n else "prefill tok/s", "prefill", 0))
        rows.append((f"decode tok/s, 1 stream ({ctx.n_predict} tokens)", "decode1", 1))
        rows.append((f"decode tok/s, {ctx.streams} streams total", "decode_agg", 1))
        label = CONFIGS[cfg]
        for name, key, d in rows:
            o, p = med(ours, key), med(peer, key)
            lines.append(f"| {label} | {name} | {fmt(o, d)} | {fmt(p, d)} | {ratio(o, p)} |")
            label = " "
        if cfg == "a":
            o, p = med(ours, "ready"), med(peer, "ready")
            lines.append(f"|   | time to ready, s | {fmt(o, 2)} | {fmt(p, 2)} | {ratio(o, p)} |")
        else:
            o, p = med(ours[:1], "ready"), med(peer[:1], "ready")
            lines.append(f"|   | time to ready, s (cold node caches) | {fmt(o, 2)} | {fmt(p, 2)} | {ratio(o, p)} |")
            if max(len(ours), len(peer)) > 1:
                o, p = med(ours[1:], "ready"), med(peer[1:], "ready")
                lines.append(f"|   | time to ready, s (warm node caches) | {fmt(o, 2)} | {fmt(p, 2)} | {ratio(o, p)} |")
            o, p = med(ours, "node_ready"), med(peer, "node_ready")
            lines.append(f"|   | nodes' start to listening, s | {fmt(o, 2)} | {fmt(p, 2)} | {ratio(o, p)} |")
        cells = []
        for rs in (ours, peer):
            if not rs:
                cells.append((None, "—"))
                continue
            parts = [statistics.median(r["rss"][i] for r in rs) for i in range(len(rs[0]["rss"]))]
            total = sum(parts)
            cells.append((total, f"{total:.0f}" if len(parts) == 1 else f"{total:.0f} ({' + '.join(f'{x:.0f}' for x in parts)})"))
        what = "peak RSS, MiB" if cfg == "a" else "peak RSS, MiB (frontend + nodes)"
        lines.append(f"|   | {what} | {cells[0][1]} | {cells[1][1]} | {ratio(cells[0][0], cells[1][0])} |")
        if ours and peer:
            a, b = ours[0]["text"], peer[0]["text"]
            notes.append(f"{CONFIGS[cfg]}: greedy 1-stream texts agree on the first {common_prefix(a, b)} of "
                         f"{max(len(a), len(b))} characters")
        srcs = {f"{r['prefill_src']}/{r['decode1_src']}" for r in ours + peer}
        if srcs != {"timings/timings"}:
            notes.append(f"{CONFIGS[cfg]}: prefill/decode measured from {', '.join(sorted(srcs))}")
        if any(r.get("prompt_cached") for r in ours + peer):
            notes.append(f"{CONFIGS[cfg]}: some prefill prompts were served from a cache")
    if "--no-repack" in ctx.peer_args:
        notes.append("llama-server ran with --no-repack (no AMX / repacked weight buffers): its AMX kernels died of "
                     "SIGILL on this machine")
    return "\n".join(lines) + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "")


# -- main ---------------------------------------------------------------------------------------------
def find_ours(name: str) -> str:
    p = Path(sys.executable).parent / name
    found = str(p) if p.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found next to {sys.executable} or on PATH (pip install -e . first)")
    return found


def wait_for_llama(bin_dir: Path, names: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    said = False
    while True:
        missing = [n for n in names if not os.access(bin_dir / n, os.X_OK)]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"{', '.join(missing)} not in {bin_dir} after {timeout:.0f} s (or use --ours-only)")
        if not said:
            print(f"waiting for {', '.join(missing)} to appear in {bin_dir} (the llama.cpp build) ...", file=sys.stderr)
            said = True
        time.sleep(10)


def llama_version(bin_dir: Path) -> str:
    try:
        r = subprocess.run([str(bin_dir / "llama-server"), "--version"], capture_output=True, text=True, timeout=60)
        for line in (r.stdout + r.stderr).splitlines():
            if line.startswith("version:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "unknown version"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("-t", "--threads", type=int, default=2, help="threads of each server (frontend); nodes get 1")
    ap.add_argument("--llama-bin", default="/root/llamacpp/build/bin", help="dir with llama-server, ggml-rpc-server")
    ap.add_argument("--only", default="a,b,c", help="configurations, comma-separated (a, b, c)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n-predict", type=int, default=128, help="tokens per stream")
    ap.add_argument("--ours-only", action="store_true", help="skip llama.cpp")
    ap.add_argument("--prompt-tokens", type=int, default=300, help="prefill prompt length")
    ap.add_argument("-np", "--parallel", type=int, default=8)
    ap.add_argument("-c", "--ctx-size", type=int, default=8192)
    ap.add_argument("--streams", type=int, default=8, help="concurrent streams")
    ap.add_argument("--delay-ms", type=float, default=1.0, help="(c): one-way delay per node link")
    ap.add_argument("--rate-mbit", type=float, default=1000.0, help="(c): rate cap per direction per node link")
    ap.add_argument("--peer-args", default="", help="extra llama-server flags, space-separated (write --peer-args=--no-repack; "
                    "added by itself when llama-server dies of SIGILL in its AMX kernels)")
    ap.add_argument("--ours-args", default="", help="extra llamarpc flags, space-separated (e.g. --ours-args='-ctk f16 "
                    "-ctv f16' for llama.cpp's default KV cache type)")
    ap.add_argument("--wait-bin", type=float, default=3600, help="seconds to wait for the llama.cpp binaries")
    ap.add_argument("--json", default=None, help="write every round's numbers here")
    ap.add_argument("--logs", default=None, help="keep the servers' logs in this dir (default: a temp dir, removed)")
    args = ap.parse_args()
    configs = [c.strip() for c in args.only.split(",") if c.strip()]
    if not configs or any(c not in CONFIGS for c in configs):
        ap.error(f"--only takes a comma-separated subset of {','.join(CONFIGS)}")
    if not Path(args.model).exists():
        ap.error(f"no model at {args.model} (scripts/get-model.sh)")
    args.model = str(Path(args.model).resolve())
    args.llama_bin = Path(args.llama_bin)
    systems = ("ours",) if args.ours_only else SYSTEMS
    if not args.ours_only:
        need = ["llama-server"] + (["ggml-rpc-server"] if set(configs) & {"b", "c"} else [])
        wait_for_llama(args.llama_bin, need, args.wait_bin)
    args.ours_frontend, args.ours_node = find_ours("llamarpc"), find_ours("llamarpc-server")
    args.prompt = None
    args.peer_args = args.peer_args.split()
    args.ours_args = args.ours_args.split()

    def on_signal(signum, frame) -> None:  # noqa: ARG001
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    res: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory(prefix="llamarpc-bench-") as tmp:
        args.tmp = Path(tmp)
        args.logs = Path(args.logs) if args.logs else args.tmp
        args.logs.mkdir(parents=True, exist_ok=True)
        try:
            for cfg in configs:
                res[cfg] = {s: [] for s in systems}
                for rnd in range(args.rounds):
                    for system in systems:
                        print(f"{CONFIGS[cfg]}, {system}, round {rnd + 1}/{args.rounds} ...", file=sys.stderr, flush=True)
                        try:
                            r = run_round(cfg, system, rnd, args)
                        except IllegalInstruction:
                            args.peer_args.append("--no-repack")
                            print("  llama-server died of SIGILL (AMX kernels, not enabled on this machine): "
                                  "again with --no-repack", file=sys.stderr, flush=True)
                            r = run_round(cfg, system, rnd, args)
                        res[cfg][system].append(r)
                        print(f"  ready {r['ready']:.2f} s, prefill {r['prefill']:.0f}, decode {r['decode1']:.1f}, "
                              f"{args.streams} streams {r['decode_agg']:.1f} tok/s, RSS "
                              f"{' + '.join(f'{x:.0f}' for x in r['rss'])} MiB", file=sys.stderr, flush=True)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)          # let the sweep finish
            stop(PROCS)
            if args.json:
                Path(args.json).write_text(json.dumps({k: v for k, v in vars(args).items() if isinstance(
                    v, (str, int, float, list, type(None)))} | {"results": res}, indent=1, default=str))
    peer = "—" if args.ours_only else (f"llama.cpp {llama_version(args.llama_bin)} ({args.llama_bin})"
                                        + (f", llama-server {' '.join(args.peer_args)}" if args.peer_args else "")
                                        + (f"; llamarpc {' '.join(args.ours_args)}" if args.ours_args else ""))
    print(f"\n{Path(args.model).name}, -t {args.threads} -np {args.parallel} -c {args.ctx_size}, nodes -t 1; "
          f"greedy, EOS ignored; median of {args.rounds} round(s); peer: {peer}\n")
    print(table(res, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
