#!/usr/bin/env python
"""Benchmark the llamarpc server against llama.cpp's (through llama-cpp-python's server) on the same
GGUF and settings, in one run, one server at a time. Prints tables; asserts nothing.

1. throughput: 1, 4 and 8 concurrent streamed /v1/completions (64 tokens each, EOS banned, greedy):
   time to first token (TTFT), per-stream decode tokens/s and aggregate tokens/s, and our/reference
   ratios.
2. stall (ours only): 4 streams decode, then a ~1,000-token prompt arrives; the streams'
   inter-token gaps before and during its prefill, in units of a decode step.

    python scripts/bench_server.py -m models/SmolLM2-135M-Instruct.Q4_1.gguf -t 2 \\
        --ref-python /work/refenv/bin/python

The reference needs `pip install 'llama-cpp-python[server]'` in the --ref-python environment.
llama-cpp-python's server runs one request at a time (no slots, no continuous batching; started
with --interrupt_requests False so a new request waits instead of cutting the running one off):
its 4- and 8-stream numbers include queueing, which is what a client of it sees.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
N_TOKENS = 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc: subprocess.Popen, path: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def start(cmd: list[str], url: str, health: str, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
    wait_up(url, proc, health)
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def stream_once(url: str, prompt: str, n: int, eos_ids: list[int], stamps: list[float] | None = None,
                extra: dict | None = None) -> dict:
    """One streamed /v1/completions; returns send time, chunk times and the text."""
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
            "logit_bias": {str(t): -100 for t in eos_ids}, **(extra or {})}
    t0 = time.perf_counter()
    times: list[float] = []
    text = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            piece = ev["choices"][0].get("text") or ""
            if piece:
                now = time.perf_counter()
                times.append(now)
                text.append(piece)
                if stamps is not None:
                    stamps.append(now)
    return {"t0": t0, "times": times, "text": "".join(text)}


def concurrent(url: str, prompts: list[str], eos_ids: list[int]) -> dict:
    results: list[dict] = [{}] * len(prompts)

    def run(i: int) -> None:
        results[i] = stream_once(url, prompts[i], N_TOKENS, eos_ids)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ttft = [r["times"][0] - r["t0"] for r in results]
    per_stream = [(len(r["times"]) - 1) / (r["times"][-1] - r["times"][0]) for r in results if len(r["times"]) > 1]
    start_ = min(r["t0"] for r in results)
    end = max(r["times"][-1] for r in results)
    n_chunks = sum(len(r["times"]) for r in results)
    return {"ttft_mean": statistics.mean(ttft), "ttft_max": max(ttft), "tps_stream": statistics.mean(per_stream),
            "tps_total": n_chunks / (end - start_), "chunks": n_chunks, "texts": [r["text"] for r in results]}


PROMPTS = [f"Here is a short story about {w}. Once upon a time," for w in
           ("a cat", "a dragon", "the sea", "a robot", "a baker", "the moon", "a violin", "a mountain")]


def throughput(url: str, eos_ids: list[int], levels: list[int]) -> dict[int, dict]:
    stream_once(url, "Warm up.", 8, eos_ids)
    return {n: concurrent(url, PROMPTS[:n], eos_ids) for n in levels}


def long_prompt(url: str, n_tokens: int) -> tuple[str, int]:
    """The longest list prompt of at most n_tokens tokens (measured with the server's tokenizer)."""
    def make(words: int) -> tuple[str, int]:
        text = "Summarize the following list. " + " ".join(f"item{i}" for i in range(words))
        return text, len(httpx.post(url + "/tokenize", json={"content": text}).json()["tokens"])

    lo, hi = 1, n_tokens
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if make(mid)[1] <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    return make(lo)


def stall(url: str, eos_ids: list[int], n_tokens: int) -> dict:
    """4 streams decode; a long prompt arrives once each has ~20 tokens."""
    text, n_tok = long_prompt(url, n_tokens)
    stamps: list[list[float]] = [[] for _ in range(4)]
    threads = [threading.Thread(target=stream_once, args=(url, PROMPTS[i], 200, eos_ids, stamps[i],
                                                           {"cache_prompt": False})) for i in range(4)]
    for t in threads:
        t.start()
    while min(len(s) for s in stamps) < 20:
        time.sleep(0.005)
    res = stream_once(url, text, 4, eos_ids, extra={"cache_prompt": False})
    t_send, t_first = res["t0"], res["times"][0]
    for t in threads:
        t.join()
    before, during = [], []
    for st in stamps:
        for a, b in zip(st, st[1:]):
            if b <= t_send:
                before.append(b - a)
            elif a < t_first:          # the gap overlaps [sent, first token of the long prompt]
                during.append(b - a)
    step = statistics.median(before)
    return {"prompt_tokens": n_tok, "prefill_s": t_first - t_send, "step_ms": 1e3 * step,
            "before_max_ms": 1e3 * max(before), "before_p95_ms": 1e3 * sorted(before)[int(0.95 * (len(before) - 1))],
            "during_median_ms": 1e3 * statistics.median(during),
            "during_p95_ms": 1e3 * sorted(during)[int(0.95 * (len(during) - 1))],
            "during_max_ms": 1e3 * max(during), "max_delay_steps": (max(during) - step) / step,
            "n_gaps_during": len(during)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-c", "--ctx-size", type=int, default=4096)
    ap.add_argument("--ref-python", default="/work/refenv/bin/python",
                    help="python with llama-cpp-python[server]; '' to skip the reference")
    ap.add_argument("--levels", default="1,4,8")
    ap.add_argument("--only", choices=["throughput", "stall"], default=None)
    ap.add_argument("--stall-tokens", type=int, default=1000, help="tokens in the long prompt")
    ap.add_argument("--logs", default="/tmp")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    eos_ids = [0, 2]   # SmolLM2: <|endoftext|>, <|im_end|> (banned so every stream runs to N_TOKENS)
    logs = Path(args.logs)
    env_threads = {"OMP_NUM_THREADS": str(args.threads), "OPENBLAS_NUM_THREADS": str(args.threads)}
    os.environ.update(env_threads)
    ours_cmd = [sys.executable, "-m", "llamarpc.frontend.cli", "-m", args.model, "-t", str(args.threads),
                "--host", "127.0.0.1"]
    out: dict[str, dict] = {}
    if args.only in (None, "throughput"):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start([*ours_cmd, "-c", str(args.ctx_size), "-np", str(max(levels)), "--port", str(port)],
                     url, "/health", logs / "bench_ours.log")
        try:
            out["ours"] = throughput(url, eos_ids, levels)
        finally:
            stop(proc)
        if args.ref_python:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = start([args.ref_python, "-m", "llama_cpp.server", "--model", args.model, "--n_ctx",
                          str(args.ctx_size), "--n_threads", str(args.threads), "--n_threads_batch",
                          str(args.threads), "--n_batch", "512", "--host", "127.0.0.1", "--port", str(port),
                          "--verbose", "False", "--interrupt_requests", "False"],
                         url, "/v1/models", logs / "bench_ref.log")
            try:
                out["ref"] = throughput(url, eos_ids, levels)
            finally:
                stop(proc)
        print(f"\nthroughput: {N_TOKENS} tokens per stream, greedy, -t {args.threads}, -c {args.ctx_size}")
        print(f"{'streams':>7} {'server':>6} {'TTFT mean':>10} {'TTFT max':>9} {'tok/s/stream':>13} {'tok/s total':>12}")
        for n in levels:
            for name in out:
                r = out[name][n]
                print(f"{n:>7} {name:>6} {r['ttft_mean'] * 1e3:>8.0f}ms {r['ttft_max'] * 1e3:>7.0f}ms "
                      f"{r['tps_stream']:>13.1f} {r['tps_total']:>12.1f}")
            if "ref" in out:
                o, f = out["ours"][n], out["ref"][n]
                ratios = (o["ttft_mean"] / f["ttft_mean"], o["ttft_max"] / f["ttft_max"],
                          o["tps_stream"] / f["tps_stream"], o["tps_total"] / f["tps_total"])
                print(f"{n:>7} {'ratio':>6} {ratios[0]:>9.2f}x {ratios[1]:>8.2f}x {ratios[2]:>12.2f}x "
                      f"{ratios[3]:>11.2f}x   (ours / llama.cpp)")
                same = sum(a == b for a, b in zip(o["texts"], f["texts"]))
                print(f"{'':>7} {'':>6} same greedy text as the reference: {same}/{n} streams")
    if args.only in (None, "stall"):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start([*ours_cmd, "-c", "5120", "-np", "5", "--port", str(port)], url, "/health",
                     logs / "bench_stall.log")
        try:
            s = stall(url, eos_ids, args.stall_tokens)
        finally:
            stop(proc)
        print(f"\nstall: a {s['prompt_tokens']}-token prompt arrives while 4 streams decode (-np 5, 1024 a slot)")
        print(f"  decode step before (median gap)    {s['step_ms']:8.1f} ms   (p95 {s['before_p95_ms']:.1f} ms, "
              f"max {s['before_max_ms']:.1f} ms before the prompt: the noise floor)")
        print(f"  gaps during its prefill ({s['n_gaps_during']:>3})     median {s['during_median_ms']:.1f} ms, "
              f"p95 {s['during_p95_ms']:.1f} ms, max {s['during_max_ms']:.1f} ms")
        print(f"  largest extra delay of a next token {s['max_delay_steps']:8.2f} steps")
        print(f"  prefill of the long prompt          {s['prefill_s']:8.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
