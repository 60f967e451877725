#!/usr/bin/env python3
"""Embedding throughput: inputs/s and tokens/s of the in-process engine (one LocalBackend) with a
pooling, for batches of short texts, as the embedder runs them (one Compute per group of inputs
that fits --ubatch-size).

    python scripts/bench_embed.py [-m models/SmolLM2-135M-Instruct.Q4_1.gguf] [--pooling mean] \
        [-n 64] [-ub 512] [-t 2] [--seconds 20]

Prints one row per batch size. Run it on a quiet machine; a busy one gives lower figures.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["The lighthouse keeper climbed the stairs every evening.", "What is the capital of France?",
         "Embeddings map text to vectors.", "A quick brown fox jumps over the lazy dog.",
         "Rain is expected tomorrow afternoon in the north.", "def add(a, b): return a + b",
         "She sold the old bicycle to her neighbour for ten euros.", "Photosynthesis turns light into sugar."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--pooling", default="mean")
    ap.add_argument("-n", "--inputs", type=int, default=64, help="inputs per request")
    ap.add_argument("-ub", "--ubatch-size", type=int, default=512)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20.0, help="time per batch size (at most)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from threadpoolctl import threadpool_limits
    threadpool_limits(args.threads)
    from llamarpc.client.local import LocalBackend
    from llamarpc.frontend.engine import Engine, EngineConfig, load_model
    from llamarpc.frontend.engine.embed import attach_embedder

    model = load_model(args.model, [LocalBackend()], n_ctx=2048)
    eng = Engine(model, EngineConfig(warmup=False, n_ubatch=args.ubatch_size, n_batch=args.ubatch_size))
    eng.start()
    try:
        attach_embedder(model, eng, args.pooling)
        print(f"{Path(args.model).name}, pooling {args.pooling}, ubatch {args.ubatch_size}, {args.threads} threads")
        print(f"{'batch':>6} {'tokens/input':>13} {'inputs/s':>10} {'tokens/s':>10}")
        for batch in sorted({1, 8, args.inputs}):
            inputs = [model.tokenizer.encode(TEXTS[i % len(TEXTS)]) for i in range(batch)]
            eng.call(lambda e, x=inputs: e.embedder.run(e, x)).result()      # the first pays one-time costs
            n, t0 = 0, time.perf_counter()
            while n == 0 or time.perf_counter() - t0 < args.seconds / 3:
                eng.call(lambda e, x=inputs: e.embedder.run(e, x)).result()
                n += 1
            dt = time.perf_counter() - t0
            toks = sum(map(len, inputs))
            print(f"{batch:>6} {toks / batch:>13.1f} {n * batch / dt:>10.1f} {n * toks / dt:>10.0f}")
    finally:
        eng.stop()
        model.close()


if __name__ == "__main__":
    main()
