#!/usr/bin/env python3
"""Speculative decoding's decode speed-up: the same greedy run with and without a drafter.

    python scripts/bench_spec.py [-m models/SmolLM2-135M-Instruct.Q4_1.gguf] [-n 96] [-t 2] \
        [--spec-type ngram-simple] [--ngram-n 4] [--draft-max 16] [-md DRAFT.gguf] [--repeats 3]

One process, the model loaded once (in process); each configuration runs `--repeats` times, the
plain and the speculative runs alternating so a busy machine slows both alike. The prompt is
repetitive (a list repeated), where n-gram lookup has something to find. Prints each run's decode
tokens/s and the acceptance, then the ratio of the medians; both outputs must be equal, token for
token (greedy), or the script fails.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Inventory: apples 12, pears 7, plums 30, figs 4, dates 19, limes 8, kiwis 15.\n" * 6
log = logging.getLogger("bench_spec")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("-md", "--model-draft", default=None, help="a draft model (instead of / after n-gram lookup)")
    ap.add_argument("--spec-type", default="ngram-simple", choices=("none", "ngram-simple"))
    ap.add_argument("--ngram-n", type=int, default=4)
    ap.add_argument("--ngram-m", type=int, default=48)
    ap.add_argument("--draft-max", type=int, default=16)
    ap.add_argument("--draft-p-min", type=float, default=0.8)
    ap.add_argument("-n", type=int, default=96, help="tokens to generate")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from threadpoolctl import threadpool_limits
    threadpool_limits(a.threads)
    from llamarpc.client.local import LocalBackend, set_threads
    from llamarpc.frontend.engine import Engine, EngineConfig, TaskParams, load_model
    from llamarpc.frontend.engine.speculative import ModelDrafter, NgramDrafter, SpecParams, Speculative
    from llamarpc.frontend.sampling import SamplingParams

    set_threads(a.threads)
    model = load_model(a.model, [LocalBackend()], n_ctx=1024)
    drafters: list = []
    if a.spec_type == "ngram-simple":
        drafters.append(NgramDrafter(a.ngram_n, a.ngram_m))
    if a.model_draft:
        drafters.append(ModelDrafter(load_model(a.model_draft, [LocalBackend()], n_ctx=1024), 1))
    if not drafters:
        raise SystemExit("nothing to compare: give --spec-type ngram-simple and/or -md")
    spec = Speculative(drafters, SpecParams(n_max=a.draft_max, p_min=a.draft_p_min), model.n_vocab)
    ids = model.tokenizer.encode(PROMPT)
    params = TaskParams(sampling=SamplingParams(temperature=0), n_predict=a.n, ignore_eos=True, cache_prompt=False)
    eng = Engine(model, EngineConfig(warmup=True))      # one engine; its drafter is set between runs
    configs = {"plain": None, "spec": spec}
    tps: dict[str, list[float]] = {k: [] for k in configs}
    outs: dict[str, list[int]] = {}
    eng.start()
    try:
        for r in range(a.repeats + 1):          # the first round warms up and is not counted
            for name, sp in configs.items():
                eng.spec = sp                   # the engine is idle between two streams
                f = list(eng.stream(ids, params))[-1]
                t = f.timings
                if outs.setdefault(name, f.tokens) != f.tokens:
                    raise SystemExit(f"{name}: run {r} differs from its first")
                if r == 0:
                    continue
                tps[name].append(1e3 * t.predicted_n / t.predicted_ms)
                acc = f" drafted {t.draft_n}, accepted {t.draft_n_accepted}" if t.draft_n else ""
                print(f"{name:5s} run {r}: {t.predicted_n} tokens, {tps[name][-1]:7.1f} tokens/s{acc}")
    finally:
        eng.stop()
    if outs["plain"] != outs["spec"]:
        raise SystemExit("the speculative output differs from the plain one")
    med = {k: statistics.median(v) for k, v in tps.items()}
    print(f"median decode: plain {med['plain']:.1f} tokens/s, speculative ({spec.name}) {med['spec']:.1f} tokens/s, "
          f"speed-up {med['spec'] / med['plain']:.2f}x; outputs equal ({len(outs['spec'])} tokens)")
    spec.close()
    model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
