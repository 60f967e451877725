"""Embeddings (/v1/embeddings, /embedding) and rerank (/v1/rerank and aliases) on synthetic GGUFs
against the numpy reference, and on SmolLM2 (skipped without the file)."""
from __future__ import annotations

import base64
from pathlib import Path

import httpx
import numpy as np
import pytest
from llamarpc.frontend.api.routes_embed import normalize
from serverproc import start_server
from synth import reference_hidden, write_model

SMOL = Path(__file__).resolve().parent.parent / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    path = tmp_path_factory.mktemp("embed") / "synth.gguf"
    return write_model(path, n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, seed=5, cls_out=1)


def _serve(path, *flags):
    srv, url = start_server(["-m", str(path), "-c", "512", "-np", "2", "-ub", "64", *flags])
    return srv, httpx.Client(base_url=url, timeout=60)


@pytest.fixture(scope="module")
def mean(synth):
    srv, http = _serve(synth.path, "--embeddings", "--pooling", "mean")
    yield http
    http.close()
    srv.stop()


def _vecs(r) -> list[np.ndarray]:
    assert r.status_code == 200, r.text
    return [np.array(d["embedding"], np.float32) for d in r.json()["data"]]


def test_mean_against_reference(mean, synth):
    toks = [[72, 101, 108], [50, 60, 70, 80, 90]]
    r = mean.post("/v1/embeddings", json={"input": toks})
    body = r.json()
    assert body["object"] == "list" and body["usage"] == {"prompt_tokens": 8, "total_tokens": 8}
    assert [d["index"] for d in body["data"]] == [0, 1] and body["data"][0]["object"] == "embedding"
    got = _vecs(r)
    for t, v in zip(toks, got):
        ref = reference_hidden(synth, t).mean(0)
        np.testing.assert_allclose(v, ref / np.linalg.norm(ref), atol=2e-5)
        assert abs(np.linalg.norm(v) - 1) < 1e-5
    assert np.abs(got[0] - got[1]).max() > 1e-2


def test_batch_equals_each_alone_and_shapes(mean):
    texts = ["hello there", "a different input", "x"]
    batch = _vecs(mean.post("/v1/embeddings", json={"input": texts}))
    alone = [_vecs(mean.post("/v1/embeddings", json={"input": t}))[0] for t in texts]
    for a, b in zip(batch, alone):
        np.testing.assert_allclose(a, b, atol=1e-6)
    b64 = mean.post("/v1/embeddings", json={"input": texts[0], "encoding_format": "base64"}).json()
    dec = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), "<f4")
    np.testing.assert_allclose(dec, alone[0], atol=1e-7)
    ids = mean.post("/v1/embeddings", json={"input": [104, 105]}).json()    # token ids: one input
    assert len(ids["data"]) == 1 and ids["usage"]["prompt_tokens"] == 2
    raw = mean.post("/embedding", json={"content": texts[0], "embd_normalize": -1}).json()
    v = np.array(raw[0]["embedding"][0])
    np.testing.assert_allclose(v / np.linalg.norm(v), alone[0], atol=1e-5)
    taxi = np.array(mean.post("/embedding", json={"input": texts[0], "embd_normalize": 1}).json()[0]["embedding"][0])
    assert abs(np.abs(taxi).sum() - 1) < 1e-5


def test_bad_input_is_400(mean):
    for body in ({"input": ""}, {"input": []}, {}, {"input": "x", "encoding_format": "hex"}, {"input": 5},
                 {"input": [10 ** 6]}, {"input": "x", "embd_normalize": "two"}, {"input": "x" * 300}):
        r = mean.post("/v1/embeddings", json=body)
        assert r.status_code == 400, (body, r.text)
        assert set(r.json()["error"]) == {"code", "message", "type"}
    assert "physical batch" in mean.post("/v1/embeddings", json={"input": "x" * 300}).json()["error"]["message"]
    r = mean.post("/v1/rerank", json={"query": "a", "documents": ["b"]})
    assert r.status_code == 501 and "--reranking" in r.json()["error"]["message"]


def test_pooling_none_and_generation_beside(synth):
    srv, http = _serve(synth.path, "--embeddings", "--pooling", "none")
    try:
        toks = [30, 40, 50, 60]
        out = http.post("/embedding", json={"content": toks}).json()
        rows = np.array(out[0]["embedding"])
        assert rows.shape == (4, 64)
        np.testing.assert_allclose(rows, reference_hidden(synth, toks), atol=2e-5)
        r = http.post("/v1/embeddings", json={"input": "abc"})
        assert r.status_code == 400 and "not OAI compatible" in r.json()["error"]["message"]
        # completions still run beside it, and the KV cells the embedding took are free again
        r = http.post("/completion", json={"prompt": "hello", "n_predict": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["tokens_predicted"] == 4
    finally:
        http.close()
        srv.stop()


def test_without_embeddings_is_501(synth):
    srv, http = _serve(synth.path)
    try:
        r = http.post("/v1/embeddings", json={"input": "abc"})
        assert r.status_code == 501 and "--embeddings" in r.json()["error"]["message"]
        assert http.post("/embedding", json={"content": "abc"}).status_code == 501
    finally:
        http.close()
        srv.stop()


def test_rerank(synth):
    w, b = synth.weights["cls.output.weight"], synth.weights["cls.output.bias"]
    srv, http = _serve(synth.path, "--reranking")
    try:
        docs = ["hello world", "the other one", "xyz", "hell"]
        r = http.post("/v1/rerank", json={"query": "he", "documents": docs, "top_n": 3})
        assert r.status_code == 200, r.text
        res = r.json()["results"]
        assert len(res) == 3
        scores = {}
        for i, d in enumerate(docs):
            ids = http.post("/tokenize", json={"content": "he" + d}).json()["tokens"]
            ref = reference_hidden(synth, ids)[-1] @ w.T.astype(np.float64) + b   # rank pools the last token
            scores[i] = float(ref[0])
        want = sorted(scores, key=lambda i: -scores[i])[:3]
        assert [x["index"] for x in res] == want
        for x in res:
            assert abs(x["relevance_score"] - scores[x["index"]]) < 1e-4
        for path in ("/rerank", "/reranking", "/v1/reranking"):
            r2 = http.post(path, json={"query": "he", "documents": docs, "return_text_documents": True})
            assert r2.status_code == 200 and len(r2.json()["results"]) == 4
            assert r2.json()["results"][0]["document"]["text"] == docs[want[0]]
        for body in ({"documents": docs}, {"query": 1, "documents": docs}, {"query": "q"},
                     {"query": "q", "documents": "d"}, {"query": "q", "documents": [1]},
                     {"query": "q", "documents": docs, "top_n": "x"}):
            r3 = http.post("/v1/rerank", json=body)
            assert r3.status_code == 400, (body, r3.text)
    finally:
        http.close()
        srv.stop()


def test_rank_needs_a_head(tmp_path):
    from llamarpc.client.local import LocalBackend
    from llamarpc.frontend.engine import load_model
    from llamarpc.frontend.engine.embed import Embedder
    m = write_model(tmp_path / "nohead.gguf", n_layer=1, n_embd=32, n_head=2, n_head_kv=1, n_ff=64)
    model = load_model(str(m.path), [LocalBackend()], n_ctx=64)
    with pytest.raises(ValueError, match="classification head"):
        Embedder(model, 4)
    model.close()


def test_normalize_modes():
    v = np.array([3.0, -4.0], np.float32)
    np.testing.assert_allclose(normalize(v, 2), [0.6, -0.8], rtol=1e-6)
    np.testing.assert_allclose(normalize(v, -1), v)
    np.testing.assert_allclose(normalize(v, 0), v / (4.0 / 32760.0), rtol=1e-6)
    np.testing.assert_allclose(normalize(np.zeros(2, np.float32), 2), [0, 0])


@pytest.mark.skipif(not SMOL.exists(), reason="SmolLM2 not downloaded")
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_smollm2(pooling):
    srv, http = _serve(SMOL, "--embeddings", "--pooling", pooling, "-ub", "256")
    try:
        texts = ["The cat sat on the mat.", "Quantum chromodynamics describes the strong force."]
        batch = _vecs(http.post("/v1/embeddings", json={"input": texts}))
        for v in batch:
            assert v.shape == (576,) and abs(np.linalg.norm(v) - 1) < 1e-4
        assert float(batch[0] @ batch[1]) < 0.999
        for t, b in zip(texts, batch):
            np.testing.assert_allclose(_vecs(http.post("/v1/embeddings", json={"input": t}))[0], b, atol=1e-4)
    finally:
        http.close()
        srv.stop()
