"""The real model (SmolLM2-135M-Instruct Q4_1) against a fixture made by an independent float32
implementation (HF transformers + torch loading the same GGUF; scripts/make_logits_fixture.py)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import FIXTURES, greedy
from llamarpc.frontend.engine import LogitsProbe

REF = json.loads((FIXTURES / "smollm2_ref.json").read_text())
REF_LOGITS = np.load(FIXTURES / "smollm2_ref_logits.npy")
PROMPTS = REF["prompts"]


def test_fixture_is_for_this_model(model_path):
    import hashlib

    h = hashlib.sha256()
    with open(model_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    assert h.hexdigest() == REF["model_sha256"]
    assert any(len(p["ids"]) >= 200 for p in PROMPTS)


@pytest.mark.parametrize("i", range(len(PROMPTS)), ids=[p["name"] for p in PROMPTS])
def test_last_position_logits_match_reference(smollm, i):
    logits = LogitsProbe(smollm).eval(PROMPTS[i]["ids"])
    err = float(np.abs(logits - REF_LOGITS[i]).max())
    assert err <= 1e-3, f"{PROMPTS[i]['name']}: max-abs {err}"


@pytest.mark.parametrize("i", range(len(PROMPTS)), ids=[p["name"] for p in PROMPTS])
def test_greedy_continuation_matches_reference(smollm, i):
    # the fixture's argmax loop goes on past an end-of-generation token; the engine stops there
    out = greedy(smollm, PROMPTS[i]["ids"], 32)
    ref = PROMPTS[i]["greedy_ids"]
    assert out == ref[:len(out)]
    assert len(out) == 32 or smollm.tokenizer.is_eog(out[-1])


def test_incremental_decode_equals_one_forward(smollm):
    ids = PROMPTS[1]["ids"]
    full = LogitsProbe(smollm).eval(ids, all_logits=True)
    g = LogitsProbe(smollm)
    g.eval(ids[:10])
    steps = np.stack([g.eval([t]) for t in ids[10:]])
    assert np.abs(steps - full[10:]).max() <= 1e-4


def test_prompt_chunks_equal_one_batch(smollm):
    ids = PROMPTS[3]["ids"]
    a = LogitsProbe(smollm, n_batch=512).eval(ids)
    b = LogitsProbe(smollm, n_batch=37).eval(ids)
    assert np.abs(a - b).max() <= 1e-4


def test_cli_one_shot(model_path):
    r = subprocess.run([sys.executable, "-m", "llamarpc.frontend.cli", "-m", str(model_path), "-p",
                        "The capital of France is", "-n", "8", "--temp", "0", "-t", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The capital of France is Paris.")
    assert "eval time" in r.stderr and "tokens per second" in r.stderr


def test_cli_chat_uses_template(model_path):
    r = subprocess.run([sys.executable, "-m", "llamarpc.frontend.cli", "-m", str(model_path), "--chat",
                        "What is the capital of France?", "-n", "16", "--temp", "0", "-t", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "<|im_start|>" not in r.stdout
