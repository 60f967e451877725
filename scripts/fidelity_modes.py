#!/usr/bin/env python3
"""Each matmul mode against the float32 fixture (HF transformers + torch on the same GGUF):
max-abs last-position logit error and greedy-continuation agreement per prompt.

    python scripts/fidelity_modes.py [-m models/SmolLM2-135M-Instruct.Q4_1.gguf] [--modes exact,fast]

Prints a markdown table; asserts nothing (tests/test_fidelity.py holds the default mode to 1e-3).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from llamarpc.client.local import LocalBackend
from llamarpc.frontend.engine import Engine, EngineConfig, LogitsProbe, TaskParams, load_model
from llamarpc.frontend.sampling import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"


def greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens through the engine (it stops after an end-of-generation token: the fixture's
    loop goes on, so a shorter list that agrees all the way counts as agreeing)."""
    eng = Engine(model, EngineConfig(warmup=False))
    eng.start()
    try:
        return list(eng.stream(ids, TaskParams(sampling=SamplingParams(temperature=0), n_predict=n)))[-1].tokens
    finally:
        eng.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--modes", default="exact,fast")
    args = ap.parse_args()
    ref = json.loads((FIXTURES / "smollm2_ref.json").read_text())
    ref_logits = np.load(FIXTURES / "smollm2_ref_logits.npy")
    print("| mode | prompt | tokens | max-abs logit error | greedy tokens equal (of 32) |")
    print("|---|---|---:|---:|---:|")
    for mode in args.modes.split(","):
        m = load_model(args.model, [LocalBackend(matmul_mode=mode)], n_ctx=1024)
        for i, p in enumerate(ref["prompts"]):
            err = float(np.abs(LogitsProbe(m).eval(p["ids"]) - ref_logits[i]).max())
            out = greedy(m, p["ids"], 32)
            same = next((j for j, (a, b) in enumerate(zip(out, p["greedy_ids"])) if a != b), len(out))
            print(f"| {mode} | {p['name']} | {len(p['ids'])} | {err:.2e} | {same} |")
        m.close()


if __name__ == "__main__":
    main()
