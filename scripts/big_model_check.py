#!/usr/bin/env python3
"""A 640 M-parameter llama model in Q4_0 (a ~360 MB file, random blocks, written here) served by two
nodes started with `--mem 400` each, against one unconstrained in-process node: same greedy tokens?

    python scripts/big_model_check.py [--mem 400] [--n 16] [--keep DIR]

Prints the file size, each node's placement and memory use, and both token lists. The CI test
(tests/test_capped_nodes.py) is the same check scaled down to a 50 MB model.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from bigmodel import write_big_q4_0_model  # noqa: E402
from llamarpc.client.local import LocalBackend  # noqa: E402
from llamarpc.client.remote import RemoteBackend  # noqa: E402
from llamarpc.frontend.engine import Engine, EngineConfig, LogitsProbe, TaskParams, load_model  # noqa: E402
from llamarpc.frontend.sampling import SamplingParams  # noqa: E402
from nodeproc import start_node  # noqa: E402


def greedy(model, ids: list[int], n: int) -> list[int]:
    eng = Engine(model, EngineConfig(warmup=False))   # one task on one slot, as `llamarpc -p` runs it
    eng.start()
    try:
        params = TaskParams(sampling=SamplingParams(temperature=0), n_predict=n, ignore_eos=True)
        return list(eng.stream(ids, params))[-1].tokens
    finally:
        eng.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mem", type=int, default=400, help="MiB each node offers")
    ap.add_argument("--n", type=int, default=16, help="greedy tokens")
    ap.add_argument("--keep", default=None, help="write the model here instead of a temporary directory")
    args = ap.parse_args()
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="llamarpc-big-"))
    t0 = time.perf_counter()
    big = write_big_q4_0_model(tmp / "big-640m-q4_0.gguf", n_layer=12, n_embd=2048, n_ff=6656, n_head=16,
                               n_head_kv=8, seed=3)
    params = big.matrix_elements
    print(f"model: {params / 1e6:.0f} M parameters in Q4_0, {big.path.stat().st_size / 1e6:.0f} MB file "
          f"(float32 copies of its matrices: {4 * params / 2**20:.0f} MiB), written in {time.perf_counter() - t0:.1f} s")
    ids = list(range(40, 60))
    nodes = [start_node(tmp, "--mem", str(args.mem)), start_node(tmp, "--mem", str(args.mem))]
    try:
        t0 = time.perf_counter()
        remote = load_model(str(big.path), [RemoteBackend(n.address) for n in nodes], n_ctx=512)
        print(f"two nodes with --mem {args.mem}: loaded in {time.perf_counter() - t0:.1f} s")
        print(remote.pipeline.placement_table())
        for s in remote.pipeline.stages:
            free, total = s.backend.get_memory()
            print(f"  {s.backend.name}: {(total - free) / 2**20:.1f} MiB used of {total / 2**20:.0f} "
                  f"(weights {s.weight_bytes / 2**20:.1f} MiB + KV {s.kv_bytes / 2**20:.1f} MiB)")
        t0 = time.perf_counter()
        a = greedy(remote, ids, args.n)
        print(f"  greedy {args.n} tokens in {time.perf_counter() - t0:.1f} s: {a}")
        la = LogitsProbe(remote).eval(ids)
        remote.close()
    finally:
        for n in nodes:
            n.stop()
    local = load_model(str(big.path), [LocalBackend()], n_ctx=512)
    b = greedy(local, ids, args.n)
    lb = LogitsProbe(local).eval(ids)
    local.close()
    print(f"one unconstrained in-process node: {b}")
    print("SAME greedy tokens" if a == b else "DIFFERENT greedy tokens",
          f"; prompt logits max-abs difference {float(abs(la - lb).max()):.3g}",
          f"(logits span {float(lb.min()):.2f}..{float(lb.max()):.2f})")


if __name__ == "__main__":
    main()
