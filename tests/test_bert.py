"""The bert architecture: the WordPiece tokenizer as llama.cpp's WPM, the encoder's embeddings
(pooling none / cls / mean) and rerank scores (classification head) on synthetic bert GGUFs
against the float64 numpy reference (tests/synth_bert.py), over one node and split over two, with
and without compiled programs; the HTTP routes on a bert model."""
from __future__ import annotations

import httpx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from llamarpc.client.local import LocalBackend
from llamarpc.frontend.api.routes_embed import rerank_tokens
from llamarpc.frontend.engine.embed import Embedder, attach_embedder
from llamarpc.frontend.engine.engine import Engine, EngineConfig
from llamarpc.frontend.engine.loader import load_model
from llamarpc.frontend.model.tokenizer import Tokenizer
from llamarpc.frontend.model.tokenizer_wpm import split_words
from llamarpc.proto import pb
from llamarpc.rpcserver import program
from llamarpc.rpcserver.node import Node
from serverproc import start_server
from synth_bert import bert_reference, nomic_bert_reference, rank_reference, write_bert, write_nomic_bert


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return write_bert(tmp_path_factory.mktemp("bert") / "bert.gguf", seed=3)


def _tok(m) -> Tokenizer:
    return Tokenizer.from_gguf(str(m.path))


def _pieces(tok: Tokenizer, text: str, **kw) -> list[str]:
    return [tok.tokens[i] for i in tok.encode(text, **kw)]


# -- tokenizer --------------------------------------------------------------------------------------

def test_wpm_words():
    assert split_words("Hello,  World!\tCafé's 中文x") == ["hello", ",", "world", "!", "cafe\u0301", "'", "s", "中", "文", "x"]
    assert split_words("a\x00b\x07c\ufffd d") == ["abc", "d"]       # NUL, controls and U+FFFD dropped
    assert split_words("   ") == []
    assert split_words("x+y=z") == ["x", "+", "y", "=", "z"]          # ASCII symbols split


def test_wpm_tokenizer(bert):
    tok = _tok(bert)
    assert _pieces(tok, "Hello, world!") == ["[CLS]", "▁hello", "▁,", "▁world", "▁!", "[SEP]"]
    # greedy longest match from the left, continuations bare; "cats" is a word of its own
    assert _pieces(tok, "cats playing dogs", add_special=False) == ["▁cats", "▁play", "ing", "▁dog", "s"]
    assert _pieces(tok, "cated", add_special=False) == ["▁cat", "ed"]
    # a word with an unmatched part is [UNK] as a whole; CJK ideographs are words of their own
    assert _pieces(tok, "the catq 中文", add_special=False) == ["▁the", "[UNK]", "▁中", "▁文"]
    assert _pieces(tok, "THE Mat.", add_special=False) == ["▁the", "▁mat", "▁."]
    # special tokens in the text are parsed (control tokens only with parse_special)
    assert _pieces(tok, "cat [SEP] dog", add_special=False) == ["▁cat", "[SEP]", "▁dog"]
    assert "[SEP]" not in _pieces(tok, "cat [SEP] dog", add_special=False, parse_special=False)
    assert tok.bos_id == tok.tokens.index("[CLS]") and tok.add_bos and tok.add_sep and not tok.add_eos
    assert tok.decode(tok.encode("hello world", add_special=False)).strip() == "hello world"


def test_wpm_add_sep_flag(tmp_path):
    m = write_bert(tmp_path / "nosep.gguf", n_layer=1, add_sep=False)
    assert _pieces(_tok(m), "hello") == ["[CLS]", "▁hello"]


def test_rerank_pair_tokens(bert):
    """llama-server's format_rerank on a bert vocabulary: [CLS] query [SEP] doc (add_bos, add_sep;
    no add_eos)."""
    tok = _tok(bert)
    q, d = tok.encode("cat", add_special=False), tok.encode("the mat", add_special=False)
    assert [tok.tokens[i] for i in rerank_tokens(tok, q, d)] == ["[CLS]", "▁cat", "[SEP]", "▁the", "▁mat"]


# -- the encoder ------------------------------------------------------------------------------------

def _engine(path, backends, **kw):
    model = load_model(str(path), backends, **kw)
    eng = Engine(model, EngineConfig(warmup=True, n_ubatch=64))   # an encoder skips the warm-up decode
    eng.start()
    return model, eng


def _run(eng, inputs):
    return eng.call(lambda e: e.embedder.run(e, inputs)).result(timeout=120)


INPUTS = ["Hello, world! The cats sat on the mat.", "dog playing", "a b c x y z"]


def _check_poolings(m, model, eng):
    tok = model.tokenizer
    ids = [tok.encode(t) for t in INPUTS]
    refs = [bert_reference(m, x) for x in ids]
    assert attach_embedder(model, eng, None).pooling == 2          # the GGUF's bert.pooling_type (cls)
    for name, want in (("none", refs), ("cls", [r[0] for r in refs]), ("mean", [r.mean(0) for r in refs])):
        attach_embedder(model, eng, name)
        got = _run(eng, ids)                                        # one batch: three sequences at once
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-4)
    mean = _run(eng, ids[:1])[0]
    attach_embedder(model, eng, "cls")
    assert np.abs(_run(eng, ids[:1])[0] - mean).max() > 1e-2          # cls and mean are not the same vector


@pytest.mark.parametrize("qtype", [T.F32, T.Q8_0])
def test_embeddings_against_reference(tmp_path, qtype):
    m = write_bert(tmp_path / "b.gguf", qtype, seed=1)
    model, eng = _engine(m.path, [LocalBackend()])
    try:
        _check_poolings(m, model, eng)
    finally:
        eng.stop()
        model.close()


def test_split_over_two_nodes_equals_reference(tmp_path):
    m = write_bert(tmp_path / "b3.gguf", n_layer=3, seed=2, token_types=False)
    model, eng = _engine(m.path, [LocalBackend(), LocalBackend()], tensor_split=[1, 2])
    try:
        assert [len(s.layers) for s in model.pipeline.stages] == [1, 2]
        _check_poolings(m, model, eng)
    finally:
        eng.stop()
        model.close()


@pytest.mark.parametrize("enabled,compiled_attention", [(False, False), (True, True), (True, False)])
def test_programs_equal_step_by_step(bert, monkeypatch, enabled, compiled_attention):
    """Small batches are compiled, the non-causal attention included (a record of its own), with
    the reference's result; an attention the program cannot compile (here: no cache layout for
    it) runs as a Python step between the records and sees the visible cells of this Compute only."""
    monkeypatch.setattr(program, "ENABLED", enabled)
    if enabled and not compiled_attention:
        monkeypatch.setattr(program.cpu_ops, "_cache_layout", lambda a: None)
    node = Node()
    model, eng = _engine(bert.path, [LocalBackend(node=node)])
    try:
        attach_embedder(model, eng, "none")
        ids = [model.tokenizer.encode(t) for t in ("cat", "dog sat")]
        seqs = [len(eng.slots), len(eng.slots) + 1]    # the embedder's sequence ids
        for _ in range(3):
            got = _run(eng, ids)
            plans = [plan for graphs in node._graphs.values() for plan in graphs.values()]
            for plan in plans:   # past this Compute's visible cells, a program's slot holds stale cells
                for prog in plan.programs.values():   # that look like the first input's: never seen
                    for i in getattr(prog, "caps", ()):
                        prog.views[i][:] = 0 if plan.inputs[i].name == "kv_pos" else seqs[0]
        for g, x in zip(got, ids):
            np.testing.assert_allclose(g, bert_reference(bert, x), atol=2e-5, rtol=1e-4)
        progs = [p for plan in plans for p in plan.programs.values() if p is not None]
        assert bool(progs) == enabled and all(p.runs >= 2 for p in progs)
        python_attention = any(getattr(s, "kind", None) == pb.ATTENTION for p in progs for s in p.segments)
        assert python_attention == (enabled and not compiled_attention)
    finally:
        eng.stop()
        model.close()


@pytest.mark.parametrize("head", ["two-layer", "output-only"])
def test_rerank_head_against_reference(tmp_path, head):
    m = write_bert(tmp_path / "rr.gguf", cls=head == "two-layer", cls_out=1, seed=4)
    model, eng = _engine(m.path, [LocalBackend()])
    try:
        eng.embedder = Embedder(model, 4)
        tok = model.tokenizer
        q = tok.encode("cat", add_special=False)
        pairs = [rerank_tokens(tok, q, tok.encode(d, add_special=False)) for d in ("the cat sat", "dog", "mat")]
        got = _run(eng, pairs)
        for g, p in zip(got, pairs):
            assert g.shape == (1,)
            np.testing.assert_allclose(g, rank_reference(m, p), atol=2e-5, rtol=1e-4)
    finally:
        eng.stop()
        model.close()


def test_http_embeddings_rerank_and_no_completions(tmp_path):
    m = write_bert(tmp_path / "http.gguf", cls=True, cls_out=1, seed=6)
    srv, url = start_server(["-m", str(m.path), "-c", "128", "-np", "2", "-ub", "128", "--embeddings"])
    http = httpx.Client(base_url=url, timeout=60)
    try:
        r = http.post("/v1/embeddings", json={"input": INPUTS[:2]})
        assert r.status_code == 200, r.text
        vecs = [np.array(d["embedding"]) for d in r.json()["data"]]
        tok = _tok(m)
        for v, t in zip(vecs, INPUTS[:2]):
            ref = bert_reference(m, tok.encode(t))[0]                   # the GGUF's cls pooling
            assert abs(np.linalg.norm(v) - 1) < 1e-5
            np.testing.assert_allclose(v, ref / np.linalg.norm(ref), atol=2e-5)
        assert np.abs(vecs[0] - vecs[1]).max() > 1e-2
        r = http.post("/v1/embeddings", json={"input": [5] * 65})           # past position_embd's 64 rows
        assert r.status_code == 400 and "at most 64" in r.json()["error"]["message"], r.text
        r = http.post("/completion", json={"prompt": "hello", "n_predict": 2})
        assert r.status_code == 501 and "encoder" in r.json()["error"]["message"], r.text
    finally:
        http.close()
        srv.stop()
    srv, url = start_server(["-m", str(m.path), "-c", "64", "-np", "2", "-ub", "64", "--reranking"])
    http = httpx.Client(base_url=url, timeout=60)
    try:
        docs = ["the cat sat", "dog", "hello world", "mat"]
        r = http.post("/v1/rerank", json={"query": "cat", "documents": docs})
        assert r.status_code == 200, r.text
        q = tok.encode("cat", add_special=False)
        want = {i: float(rank_reference(m, rerank_tokens(tok, q, tok.encode(d, add_special=False)))[0])
                for i, d in enumerate(docs)}
        res = r.json()["results"]
        assert [x["index"] for x in res] == sorted(want, key=lambda i: -want[i])
        for x in res:
            assert abs(x["relevance_score"] - want[x["index"]]) < 1e-4
    finally:
        http.close()
        srv.stop()


@pytest.mark.parametrize("qtype", [T.F32, T.Q8_0])
def test_nomic_bert_against_reference(tmp_path, qtype):
    m = write_nomic_bert(tmp_path / "nomic.gguf", qtype, seed=7)
    model, eng = _engine(m.path, [LocalBackend()])
    try:
        tok = model.tokenizer
        ids = [tok.encode(t) for t in INPUTS]
        assert attach_embedder(model, eng, None).pooling == 1              # the GGUF's (mean)
        got = _run(eng, ids)
        for g, x in zip(got, ids):
            np.testing.assert_allclose(g, nomic_bert_reference(m, x).mean(0), atol=2e-5, rtol=1e-4)
        attach_embedder(model, eng, "none")
        rows = _run(eng, ids[:1])[0]
        np.testing.assert_allclose(rows, nomic_bert_reference(m, ids[0]), atol=2e-5, rtol=1e-4)
    finally:
        eng.stop()
        model.close()


def test_wpm_equals_hf_wordpiece_on_ascii(bert):
    """An independent check: HF tokenizers' WordPiece with the BERT normalizer and pre-tokenizer
    (no accent stripping; the same vocabulary with ``##`` continuations) cuts ASCII and CJK text
    as we do."""
    tk = pytest.importorskip("tokenizers")
    tok = _tok(bert)
    vocab = {(t[1:] if t.startswith("\u2581") else t if t.startswith("[") else "##" + t): i
             for i, t in enumerate(tok.tokens)}
    hf = tk.Tokenizer(tk.models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=1000))
    hf.normalizer = tk.normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=False,
                                                  lowercase=True)
    hf.pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
    rng = np.random.default_rng(0)
    parts = ["The", "cat", "cats", "catsing", "dog", "dogs", "Played", "playing", "HELLO", "world", "mat", "qq", "zzz",
             "abc", "xyz", "中文", ".", ",", "!", "?", "'", "+", "-", "(", "=", "a.b", "x,y", "c's", " ", "  ", "\t", "\n"]
    for _ in range(200):
        text = "".join(str(p) + str(rng.choice(["", " ", " "])) for p in rng.choice(parts, size=int(rng.integers(1, 12))))
        assert tok.encode(text, add_special=False, parse_special=False) == hf.encode(text, add_special_tokens=False).ids, text


def test_refuses_what_it_does_not_run():
    from llamarpc.frontend.model.arch import bert as arch_bert
    from llamarpc.frontend.model.arch import nomic_bert
    md = {"general.architecture": "bert", "bert.block_count": 1, "bert.embedding_length": 8,
          "bert.feed_forward_length": 16, "bert.attention.head_count": 2}
    shapes = {n: (4, 8) for n in ("token_embd.weight", "position_embd.weight", "token_embd_norm.weight",
                                   "token_embd_norm.bias")}
    assert arch_bert.args_from_metadata(md, shapes).head_dim == 4
    for extra_md, extra_shapes, match in (({}, {"blk.0.attn_qkv.weight": (24, 8)}, "fused attn_qkv"),
                                          ({"bert.attention.causal": True}, {}, "causal"),
                                          ({"bert.attention.head_count_kv": 1}, {}, "head_count_kv"),
                                          ({"bert.attention.layer_norm_epsilon": 0.0}, {}, "epsilon")):
        with pytest.raises(ValueError, match=match):
            arch_bert.args_from_metadata({**md, **extra_md}, {**shapes, **extra_shapes})
    with pytest.raises(ValueError, match="position_embd"):
        arch_bert.args_from_metadata(md, {k: v for k, v in shapes.items() if k != "position_embd.weight"})
    nmd = {k.replace("bert.", "nomic-bert."): v for k, v in md.items()} | {"general.architecture": "nomic-bert"}
    nshapes = {**shapes, "blk.0.attn_qkv.weight": (24, 8)}
    assert nomic_bert.args_from_metadata(nmd, nshapes).rope_base == 1000.0
    for extra, match in (({"blk.0.attn_qkv.bias": (24,)}, "biases"), ({"blk.0.ffn_gate_inp.weight": (4, 8)}, "experts")):
        with pytest.raises(ValueError, match=match):
            nomic_bert.args_from_metadata(nmd, {**nshapes, **extra})
