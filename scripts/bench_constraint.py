#!/usr/bin/env python3
"""What a grammar costs per token: the sampler's time per token (chain, draw, grammar) for the same
greedy request free, under a JSON schema with check-then-mask (llama.cpp's way, the server's
default) and with mask-always (the next mask computed on a worker thread during the forward).

    python scripts/bench_constraint.py [-m models/SmolLM2-135M-Instruct.Q4_1.gguf] [-n 96] [-t 2]

Prints one row per mode: tokens, sampler ms/token, extra ms/token over the free request, masks
computed per token, and the forward's ms/token for scale. Greedy, so both grammar modes give the
same tokens."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "email": {"type": "string"},
    "languages": {"type": "array", "items": {"enum": ["English", "French", "German", "Spanish"]},
                  "minItems": 1, "maxItems": 3},
    "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
                "required": ["street", "city"], "additionalProperties": False}},
    "required": ["name", "age", "email", "languages", "address"], "additionalProperties": False}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("-n", type=int, default=96)
    ap.add_argument("-t", "--threads", type=int, default=2)
    a = ap.parse_args()
    from threadpoolctl import threadpool_limits
    threadpool_limits(a.threads)
    from llamarpc.client.local import LocalBackend
    from llamarpc.frontend.engine import Engine, EngineConfig, FinalEvent, TaskParams, load_model
    from llamarpc.frontend.sampling import SamplingParams, sampler
    from llamarpc.frontend.sampling.constraint import Grammar, ll_tokenizer

    model = load_model(a.model, [LocalBackend()], n_ctx=2048)
    tok = model.tokenizer
    vocab = ll_tokenizer(tok, model.n_vocab)
    prompt = tok.encode("<|im_start|>user\nDescribe a made-up person as JSON.<|im_end|>\n<|im_start|>assistant\n")
    engine = Engine(model, EngineConfig())
    engine.start()
    spent = [0.0, 0]
    inner = sampler.Sampler.sample_full

    def timed(self, logits):
        t0 = time.perf_counter()
        r = inner(self, logits)
        spent[0] += time.perf_counter() - t0
        spent[1] += 1
        return r

    sampler.Sampler.sample_full = timed
    made = []
    start = Grammar.start

    def start_and_keep(self):
        c = start(self)
        made.append(c)
        return c

    Grammar.start = start_and_keep
    rows = []
    base = None
    for mode in ("free", "check", "mask"):
        g = None if mode == "free" else Grammar.from_json_schema(SCHEMA, vocab, mode)
        for _rep in range(2):        # the first run warms caches; the second is measured
            spent[:] = [0.0, 0]
            sp = SamplingParams(temperature=0.0, grammar=g)
            last = list(engine.stream(prompt, TaskParams(sampling=sp, n_predict=a.n, cache_prompt=False,
                                                         ignore_eos=mode == "free")))[-1]
            assert isinstance(last, FinalEvent), last
        n = spent[1]
        per = 1e3 * spent[0] / n
        if mode == "free":
            base = per
        if g is not None:
            json.loads(last.content)
        n_masks = sum(c.n_masks for c in made[-1:]) if g is not None else 0
        rows.append((mode, n, per, per - (base or per), n_masks / n, last.timings.predicted_ms / max(last.n_decoded, 1)))
    engine.stop()
    print(f"{'mode':6} {'tokens':>6} {'sampler ms/tok':>14} {'extra ms/tok':>12} {'masks/tok':>9} {'decode ms/tok':>13}")
    for mode, n, per, extra, mpt, dec in rows:
        print(f"{mode:6} {n:6d} {per:14.3f} {extra:12.3f} {mpt:9.2f} {dec:13.2f}")
    print(f"output: {last.content[:200]}", file=sys.stderr)


if __name__ == "__main__":
    main()
