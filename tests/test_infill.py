"""POST /infill on a synthetic GGUF with FIM tokens (the prompt as llama-server's format_infill
builds it), one without (501), and SmolLM2 (it has only <reponame>, so no infill)."""
from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from serverproc import start_server
from synth import FIM_TOKENS, write_model

SMOL = Path(__file__).resolve().parent.parent / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def fim(tmp_path_factory):
    path = tmp_path_factory.mktemp("infill") / "fim.gguf"
    write_model(path, n_layer=1, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, seed=2, fim=True)
    srv, url = start_server(["-m", str(path), "-c", "512", "-b", "64"])
    with httpx.Client(base_url=url, timeout=60) as c:
        yield c
    srv.stop()


def _ids(http) -> dict[str, int]:
    toks = {t: http.post("/tokenize", json={"content": t, "parse_special": True}).json()["tokens"] for t in FIM_TOKENS}
    assert all(len(v) == 1 for v in toks.values())
    return {t: v[0] for t, v in toks.items()}


def _enc(http, s: str) -> list[int]:
    return http.post("/tokenize", json={"content": s, "parse_special": False}).json()["tokens"]


def test_infill_prompt(fim):
    ids = _ids(fim)
    body = {"input_prefix": "def f(x):\n    ", "input_suffix": "\n    return y\n", "prompt": "y =",
            "input_extra": [{"filename": "a.py", "text": "A = 1\n"}], "n_predict": 3, "temperature": 0}
    r = fim.post("/infill", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["tokens_predicted"] == 3
    want = ([ids["<|fim_repo|>"], *_enc(fim, "myproject\n"), ids["<|file_sep|>"], *_enc(fim, "a.py\n"),
             *_enc(fim, "A = 1\n"), ids["<|file_sep|>"], *_enc(fim, "filename\n"),
             ids["<|fim_prefix|>"], *_enc(fim, "def f(x):\n    "), *_enc(fim, "y ="),
             ids["<|fim_suffix|>"], *_enc(fim, "\n    return y\n")[:64 // 4 - 2 - 3], ids["<|fim_middle|>"]])
    assert out["tokens_evaluated"] == len(want)
    # the suffix is cut to n_batch / 4 - 2 - len(prompt) tokens, the prefix keeps its last 3/4 n_batch
    long = fim.post("/infill", json={"input_prefix": "p" * 100, "input_suffix": "s" * 100, "n_predict": 1}).json()
    n_extra = 2 + len(_enc(fim, "myproject\n")) + len(_enc(fim, "filename\n"))   # repo, file_sep
    assert long["tokens_evaluated"] == n_extra + 1 + 48 + 1 + 14 + 1                # pre, suf, mid
    stream = fim.post("/infill", json={**body, "stream": True})
    assert stream.status_code == 200 and "data: " in stream.text


def test_infill_bad_input(fim):
    for body in ({"input_extra": "x"}, {"input_extra": [{"filename": "a"}]}, {"input_extra": [{"text": 1}]},
                 {"input_extra": [{"text": "t", "filename": 3}]}, {"input_prefix": 5}, {"prompt": ["a"]}):
        r = fim.post("/infill", json=body)
        assert r.status_code == 400, (body, r.text)
        assert set(r.json()["error"]) == {"code", "message", "type"}


def test_no_fim_tokens_is_501(tmp_path):
    m = write_model(tmp_path / "plain.gguf", n_layer=1, n_embd=32, n_head=2, n_head_kv=1, n_ff=64)
    srv, url = start_server(["-m", str(m.path), "-c", "128"])
    try:
        r = httpx.post(url + "/infill", json={"input_prefix": "a", "input_suffix": "b"}, timeout=30)
        assert r.status_code == 501 and "Infill is not supported" in r.json()["error"]["message"]
    finally:
        srv.stop()


@pytest.mark.skipif(not SMOL.exists(), reason="SmolLM2 not downloaded")
def test_smollm2_has_no_fim():
    from llamarpc.frontend.model.tokenizer import Tokenizer
    ids = Tokenizer.from_gguf(str(SMOL)).special_ids
    assert ids["fim_pre"] is None and ids["fim_suf"] is None and ids["fim_mid"] is None
