"""The real Gemma 3 270M (Q4_K_M: Q5_0, Q4_K, Q6_K, Q8_0 and F32 tensors). Skipped, with the reason,
when models/gemma-3-270m-q4_k_m.gguf is absent (`scripts/get-model.sh gemma3` fetches it; CI
fetches only SmolLM2). Against: llama.cpp's tokenizer (tokenizer_gemma3.json, llama-server's
/tokenize), HF transformers' float32 forward (gemma3_ref.json + gemma3_ref_logits.npy,
scripts/make_gemma3_fixture.py), the same model split over two nodes, and the HTTP server."""
from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from conftest import FIXTURES, ROOT, greedy
from llamarpc.client.local import LocalBackend
from llamarpc.frontend.engine import LogitsProbe, load_model
from llamarpc.frontend.model.gguf_file import GGUFFile
from llamarpc.frontend.model.tokenizer import Tokenizer
from llamarpc.rpcserver.node import Node
from serverproc import start_server

MODEL = ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"
pytestmark = pytest.mark.skipif(not MODEL.exists(), reason=f"{MODEL.name} is absent (scripts/get-model.sh gemma3)")
REF_PATH = FIXTURES / "gemma3_ref.json"
REF = json.loads(REF_PATH.read_text()) if REF_PATH.exists() else {"prompts": []}
PROMPTS = REF["prompts"]


@pytest.fixture(scope="module")
def gemma():
    m = load_model(str(MODEL), [LocalBackend()], n_ctx=1024)
    yield m
    m.close()


def test_tokenizer_equals_llama_cpp():
    tok = Tokenizer.from_metadata(GGUFFile(str(MODEL)).metadata)
    fx = json.loads((FIXTURES / "tokenizer_gemma3.json").read_text())
    bad = []
    for c in fx["cases"]:
        s = c["text"]
        for key, got in (("ids", tok.encode(s, add_special=False, parse_special=True)),
                         ("ids_plain", tok.encode(s, add_special=False, parse_special=False))):
            if got != c.get(key, c["ids"]):
                bad.append(f"{key} {s!r}: {got} vs llama.cpp {c.get(key, c['ids'])}")
        if "ids_add_special" in c and tok.encode(s) != c["ids_add_special"]:
            bad.append(f"add_special {s!r}")
    assert not bad and len(fx["cases"]) > 250, bad[:5]
    assert tok.encode("Hi")[0] == 2   # BOS added


def test_fixture_is_for_this_model():
    assert PROMPTS and REF["model_sha256"] == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    long = max(PROMPTS, key=lambda p: p["n_tokens"])
    assert long["n_tokens"] > 600 and long["window_effect_max_abs"] > 1.0   # the window really matters there


@pytest.mark.parametrize("i", range(len(PROMPTS)), ids=[p["name"] for p in PROMPTS])
def test_last_position_logits_and_greedy_match_reference(gemma, i):
    p = PROMPTS[i]
    assert gemma.tokenizer.encode(p["text"], parse_special=True) == p["ids"]   # our ids are HF's (and llama.cpp's)
    logits = LogitsProbe(gemma).eval(p["ids"])
    err = float(np.abs(logits - np.load(FIXTURES / REF["logits_file"])[i]).max())
    assert err <= 1e-3, f"{p['name']}: max-abs {err}"
    out = greedy(gemma, p["ids"], 32)
    assert out == p["greedy_ids"][:len(out)] and (len(out) == 32 or gemma.tokenizer.is_eog(out[-1]))


def test_two_nodes_equal_in_process(gemma):
    ids = PROMPTS[0]["ids"] if PROMPTS else gemma.tokenizer.encode("The capital of France is")
    split = load_model(str(MODEL), [LocalBackend(node=Node()), LocalBackend(node=Node())], n_ctx=256,
                       tensor_split=[1, 1])
    try:
        assert np.array_equal(LogitsProbe(split).eval(ids), LogitsProbe(gemma).eval(ids))
        assert greedy(split, ids, 8) == greedy(gemma, ids, 8)
    finally:
        split.close()


def test_served_over_http_with_the_gemma_template(gemma):
    srv, url = start_server(["-m", str(MODEL), "-c", "512", "-np", "1", "-t", "1", "--chat-template", "gemma"])
    try:
        r = httpx.post(url + "/apply-template", json={"messages": [{"role": "user", "content": "Hi"}]}, timeout=60)
        assert r.status_code == 200
        assert r.json()["prompt"] == "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
        prompt = "The capital of France is"
        r = httpx.post(url + "/completion", json={"prompt": prompt, "n_predict": 8, "temperature": 0}, timeout=120)
        assert r.status_code == 200, r.text
        want = greedy(gemma, gemma.tokenizer.encode(prompt), 8)
        assert r.json()["content"] == gemma.tokenizer.decode(want)
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hello"}],
                                                           "max_tokens": 4, "temperature": 0}, timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(
            gemma.tokenizer.encode("<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n", parse_special=True))
    finally:
        srv.stop()
