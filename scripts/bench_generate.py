#!/usr/bin/env python3
"""One-shot generation benchmark: llamarpc (in process, 1 node, 2 nodes) beside llama.cpp.

    python scripts/bench_generate.py [-m models/SmolLM2-135M-Instruct.Q4_1.gguf] [-t 2] \
        [--peer-python /path/to/venv-with-llama-cpp-python/bin/python]

Prints a table: time to ready (from process start, and of load_model alone), prompt tokens/s,
generation tokens/s, peak RSS, and the ratio to
llama.cpp (llama-cpp-python, same GGUF, same threads, greedy) measured in the same run. Each
configuration runs in its own process, one after another; run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = ("The lighthouse keeper climbed the stairs every evening to light the great lamp. " * 24).strip()

OURS = textwrap.dedent("""
    import json, resource, sys, time
    t0 = time.perf_counter()
    from threadpoolctl import threadpool_limits
    threadpool_limits({threads})
    from llamarpc.client.local import LocalBackend
    from llamarpc.client.remote import RemoteBackend
    from llamarpc.frontend.engine import Engine, EngineConfig, TaskParams, load_model
    from llamarpc.frontend.sampling import SamplingParams
    addrs = {addrs!r}
    t1 = time.perf_counter()
    backends = [RemoteBackend(a) for a in addrs] if addrs else [LocalBackend()]
    m = load_model({model!r}, backends, n_ctx=1024)
    ready = time.perf_counter() - t0
    load = time.perf_counter() - t1
    m.pipeline.pipelined = {pipelined}
    ids = m.tokenizer.encode({prompt!r})
    eng = Engine(m, EngineConfig(warmup=False))   # what `llamarpc -p` runs: one task on one slot
    eng.start()
    t = list(eng.stream(ids, TaskParams(sampling=SamplingParams(temperature=0), n_predict={n}, ignore_eos=True,
                                        cache_prompt=False)))[-1].timings
    eng.stop()
    print(json.dumps(dict(ready=ready, load=load, n_prompt=t.prompt_n, prompt_tps=1e3 * t.prompt_n / t.prompt_ms,
                          gen_tps=1e3 * t.predicted_n / t.predicted_ms,
                          rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          sent=m.pipeline.bytes_sent)))
""")

PEER = textwrap.dedent("""
    import json, resource, time
    t0 = time.perf_counter()
    from llama_cpp import Llama
    llm = Llama({model!r}, n_ctx=1024, n_threads={threads}, n_threads_batch={threads}, n_batch=512, verbose=False)
    ready = load = time.perf_counter() - t0
    ids = llm.tokenize({prompt!r}.encode(), add_bos=False, special=True)
    t1 = time.perf_counter(); llm.eval(ids); tp = time.perf_counter() - t1
    import numpy as np
    t2 = time.perf_counter()
    for _ in range({n}):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([tok])
    tg = time.perf_counter() - t2
    print(json.dumps(dict(ready=ready, load=load, n_prompt=len(ids), prompt_tps=len(ids) / tp, gen_tps={n} / tg,
                          rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, sent=0)))
""")


def run(py: str, code: str, env: dict[str, str] | None = None) -> dict:
    r = subprocess.run([py, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode:
        raise SystemExit(f"benchmark process failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def start_nodes(n: int, threads: int, cache: str) -> tuple[list[subprocess.Popen], list[str]]:
    procs, addrs = [], []
    for i in range(n):
        port_file = Path(cache) / f"port{i}"
        env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads))
        procs.append(subprocess.Popen([sys.executable, "-m", "llamarpc.rpcserver.cli", "--port", "0",
                                       "--port-file", str(port_file), "-t", str(threads),
                                       "--cache-dir", f"{cache}/c{i}"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for _ in range(300):
            if port_file.exists() and port_file.read_text().strip():
                break
            time.sleep(0.05)
        addrs.append(f"127.0.0.1:{port_file.read_text().strip()}")
    time.sleep(0.5)
    return procs, addrs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-n", "--n-predict", type=int, default=64)
    ap.add_argument("--peer-python", default=None, help="a python with llama-cpp-python installed")
    args = ap.parse_args()
    rows = []
    common = dict(model=args.model, prompt=PROMPT, n=args.n_predict, threads=args.threads, pipelined=True)
    rows.append(("llamarpc in-process", run(sys.executable, OURS.format(addrs=[], **common))))
    for n_nodes in (1, 2):
        with tempfile.TemporaryDirectory() as cache:
            # nodes share the cores with each other: each gets threads // n_nodes
            procs, addrs = start_nodes(n_nodes, max(1, args.threads // n_nodes), cache)
            try:
                cold = run(sys.executable, OURS.format(addrs=addrs, **{**common, "threads": 1}))
                warm = run(sys.executable, OURS.format(addrs=addrs, **{**common, "threads": 1}))
                if n_nodes > 1:
                    serial = run(sys.executable, OURS.format(addrs=addrs, **{**common, "threads": 1,
                                                                             "pipelined": False}))
            finally:
                for p in procs:
                    p.terminate()
                    p.wait()
        rows.append((f"llamarpc {n_nodes} node(s), cold", cold))
        rows.append((f"llamarpc {n_nodes} node(s), warm", warm))
        if n_nodes > 1:
            rows.append((f"llamarpc {n_nodes} nodes, no micro-batches", serial))
    peer = None
    if args.peer_python:
        peer = run(args.peer_python, PEER.format(**common))
        rows.append(("llama.cpp (llama-cpp-python)", peer))
    print(f"\nmodel {Path(args.model).name}, {args.threads} threads, prompt {rows[0][1]['n_prompt']} tokens, "
          f"{args.n_predict} generated (greedy)\n")
    hdr = (f"{'configuration':32} {'ready s':>8} {'load s':>7} {'sent MiB':>9} {'prompt t/s':>11} {'gen t/s':>9} "
           f"{'peak RSS MiB':>13}")
    if peer:
        hdr += f" {'prompt ×llama.cpp':>18} {'gen ×llama.cpp':>15}"
    print(hdr)
    print("-" * len(hdr))
    for name, r in rows:
        line = (f"{name:32} {r['ready']:8.2f} {r['load']:7.2f} {r['sent'] / 2**20:9.1f} {r['prompt_tps']:11.1f} "
                f"{r['gen_tps']:9.1f} {r['rss']:13.0f}")
        if peer:
            line += f" {r['prompt_tps'] / peer['prompt_tps']:18.3f} {r['gen_tps'] / peer['gen_tps']:15.3f}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
