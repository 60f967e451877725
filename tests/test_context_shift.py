"""Context shift: the node's ROPE_SHIFT op against a plain numpy reference, its validation, the
shifted cache against a fresh prefill at the new positions (F32 and F16 caches, llama and
gemma3's neox rope), and generations that run past the slot with --context-shift."""
from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest
from llamarpc.client import GraphBuilder, TensorRef
from llamarpc.client.local import LocalBackend
from llamarpc.frontend.engine import Engine, EngineConfig, FinalEvent, TaskParams, load_model, slot_file
from llamarpc.frontend.engine.context_shift import KVShifter, n_keep_discard
from llamarpc.frontend.engine.forward import forward_micro_batches
from llamarpc.frontend.engine.kv_cells import KVCells
from llamarpc.frontend.sampling import SamplingParams
from llamarpc.proto import pb
from llamarpc.proto.errors import InvalidArgument
from llamarpc.proto.types import GGMLType as T
from llamarpc.rpcserver import kernels as K
from synth import write_model
from synth_arch import write_gemma3

GREEDY = SamplingParams(temperature=0.0)


def ref_rope_rows(x: np.ndarray, pos: np.ndarray, head_dim: int, n_dims: int, mode: int, base: float,
                  scale: float) -> np.ndarray:
    """Plain loops, float64: each pair of each head turned by pos * scale * base^(-2i/n_dims)."""
    out = x.astype(np.float64).copy()
    n, width = x.shape
    for t in range(n):
        for h in range(width // head_dim):
            o = h * head_dim
            for i in range(n_dims // 2):
                a, b = (o + i, o + i + n_dims // 2) if mode == 2 else (o + 2 * i, o + 2 * i + 1)
                th = float(pos[t]) * scale * base ** (-2.0 * i / n_dims)
                x0, x1 = float(x[t, a]), float(x[t, b])
                out[t, a] = x0 * np.cos(th) - x1 * np.sin(th)
                out[t, b] = x0 * np.sin(th) + x1 * np.cos(th)
    return out


@pytest.mark.parametrize("mode,n_dims", [(0, 8), (2, 8), (0, 4), (2, 4)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_rope_shift_matches_reference(mode, n_dims, dtype):
    rng = np.random.default_rng(mode + n_dims)
    cache = rng.standard_normal((16, 16)).astype(dtype)
    before = cache.copy()
    cells = np.array([3, 7, 1, 12], np.int32)
    delta = np.array([-5, 2, 0, -100], np.int32)
    K.rope_shift(np, cache, cells, delta, 8, n_dims, mode, 10000.0, 0.5)
    want = ref_rope_rows(before[cells].astype(np.float32), delta, 8, n_dims, mode, 10000.0, 0.5)
    tol = 1e-6 if dtype == np.float32 else 2e-3
    np.testing.assert_allclose(cache[cells].astype(np.float64), want, atol=tol, rtol=tol)
    rest = np.setdiff1d(np.arange(16), cells)
    assert np.array_equal(cache[rest], before[rest])


def test_rope_shift_composes_with_rope():
    """rope(x, p) turned by d equals rope(x, p + d), within float32 rounding."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 32)).astype(np.float32)
    p = np.array([0, 5, 17, 100, 1000, 4000], np.int32)
    d = np.array([3, -5, -17, -60, -999, -4000], np.int32)
    cache = K.rope(np, x, p, 16, 16, 0, 10000.0, 1.0).copy()
    K.rope_shift(np, cache, np.arange(6, dtype=np.int32), d, 16, 16, 0, 10000.0, 1.0)
    np.testing.assert_allclose(cache, K.rope(np, x, p + d, 16, 16, 0, 10000.0, 1.0), atol=2e-5)


def _shift_graph(ref: TensorRef, cache_as_input: bool = False, **attrs) -> pb.Graph:
    gb = GraphBuilder()
    cells = gb.input("cells", T.I32, ("n",))
    delta = gb.input("delta", T.I32, ("n",))
    k = gb.input("k", T.F32, (4, 16)) if cache_as_input else gb.tensor(ref)
    a = dict(head_dim=8, n_dims=8, rope_mode=0, freq_base=10000.0, freq_scale=1.0)
    a.update(attrs)
    gb.output("cells", gb.op(pb.ROPE_SHIFT, k, cells, delta, **a))
    return gb.build()


def test_rope_shift_node_validation():
    b = LocalBackend()
    assert pb.ROPE_SHIFT in b.hello().ops
    buf = b.alloc_buffer(4 * 16 * 4)
    b.set_tensor(buf, 0, np.arange(64, dtype=np.float32))
    ref = TensorRef(buf, 0, T.F32, (4, 16))
    for bad in (dict(cache_as_input=True), dict(head_dim=0), dict(n_dims=3), dict(rope_mode=1), dict(freq_base=0.0),
                dict(head_dim=6, n_dims=6)):
        with pytest.raises(InvalidArgument):
            b.register_graph(_shift_graph(ref, **bad))
    with pytest.raises(InvalidArgument):        # a quantized (or I32) cache is not a K cache
        b.register_graph(_shift_graph(TensorRef(buf, 0, T.I32, (4, 16))))
    mapped = b.map_buffer(np.zeros(256, np.uint8))      # read-only: a K cache there cannot be turned
    gm = b.register_graph(_shift_graph(TensorRef(mapped, 0, T.F32, (4, 16))))
    with pytest.raises(InvalidArgument, match="read-only"):
        b.compute(gm, {"cells": np.array([1], np.int32), "delta": np.array([1], np.int32)})
    gid = b.register_graph(_shift_graph(ref))
    for cells, delta in (([4], [1]), ([-1], [1]), ([0, 0], [1, 1]), ([1], [1 << 25]), ([1], [-(1 << 31)]),
                         ([1, 2], [1])):
        with pytest.raises(InvalidArgument):
            b.compute(gid, {"cells": np.array(cells, np.int32), "delta": np.array(delta, np.int32)})
    assert np.array_equal(np.frombuffer(b.get_tensor(buf, 0, 256), np.float32), np.arange(64, dtype=np.float32))
    out = b.compute(gid, {"cells": np.array([2], np.int32), "delta": np.array([3], np.int32)})
    assert out["cells"].tolist() == [2]
    got = np.frombuffer(b.get_tensor(buf, 0, 256), np.float32).reshape(4, 16)
    want = ref_rope_rows(np.arange(32, 48, dtype=np.float32)[None], np.array([3]), 8, 8, 0, 10000.0, 1.0)
    np.testing.assert_allclose(got[2], want[0], atol=1e-4)
    assert np.array_equal(got[[0, 1, 3]], np.arange(64, dtype=np.float32).reshape(4, 16)[[0, 1, 3]])


# -- a shifted cache against a fresh prefill --------------------------------------------------------
def _logits(model, kv: KVCells, tokens, pos, seq) -> np.ndarray:
    t = np.asarray(tokens, np.int32)
    want = np.zeros(t.size, bool)
    want[-1] = True
    return forward_micro_batches(model.pipeline, kv, t, np.asarray(pos, np.int32), np.full(t.size, seq, np.int32),
                                 want, 512)[0]


def _check(model, kept_before, kept_after, n_drop, tol):
    """Cache kept_before at 0.., n_drop dropped tokens, kept_after, then shift the after-part back
    by n_drop: the next token's logits equal a fresh prefill of the kept tokens at their new positions."""
    rng = np.random.default_rng(1)
    dropped = rng.integers(3, 200, n_drop).tolist()
    toks = kept_before + dropped + kept_after
    nxt = 42
    kv = KVCells(model.n_ctx)
    _logits(model, kv, toks, np.arange(len(toks)), 0)
    k = len(kept_before)
    kv.remove(0, k, k + n_drop)
    moved = np.flatnonzero((kv.seq == 0) & (kv.pos >= k + n_drop)).astype(np.int32)
    KVShifter(model.pipeline).shift(moved, np.full(moved.size, -n_drop, np.int32))
    kv.pos[moved] -= n_drop
    n = len(toks) - n_drop
    shifted = _logits(model, kv, [nxt], [n], 0)
    kept = kept_before + kept_after
    fresh = _logits(model, kv, kept + [nxt], np.arange(n + 1), 1)    # sequence 1, other cells
    assert np.abs(fresh).max() > 0.1
    np.testing.assert_allclose(shifted, fresh, atol=tol * np.abs(fresh).max(), rtol=0)
    assert np.argmax(shifted) == np.argmax(fresh)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("ctxshift")
    write_model(d / "one.gguf", n_layer=1, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, seed=2)
    write_model(d / "two.gguf", n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, seed=3)
    write_gemma3(d / "g3.gguf", n_layer=3, window=64, seed=4)
    return d


@pytest.mark.parametrize("kv_type,tol", [(T.F32, 1e-5), (T.F16, 2e-3)], ids=["f32", "f16"])
def test_shifted_cache_equals_fresh_prefill_one_layer(models, kv_type, tol):
    """One layer: its K/V depend only on the token and (K) its position, so dropping tokens from
    the middle and shifting the rest is exactly a fresh prefill of the kept tokens."""
    model = load_model(str(models / "one.gguf"), [LocalBackend()], n_ctx=128, kv_type=kv_type)
    try:
        rng = np.random.default_rng(0)
        _check(model, rng.integers(3, 200, 5).tolist(), rng.integers(3, 200, 17).tolist(), 9, tol)
    finally:
        model.close()


@pytest.mark.parametrize("name", ["two.gguf", "g3.gguf"], ids=["llama", "gemma3-neox"])
@pytest.mark.parametrize("kv_type,tol", [(T.F32, 1e-5), (T.F16, 2e-3)], ids=["f32", "f16"])
def test_shifted_cache_equals_fresh_prefill_all_layers(models, name, kv_type, tol):
    """Every layer: a sequence shifted as a whole (nothing kept before the dropped part, nothing
    attended to the dropped tokens: they came after a cut) equals the fresh prefill, since
    attention sees only relative positions."""
    model = load_model(str(models / name), [LocalBackend()], n_ctx=128, kv_type=kv_type)
    try:
        rng = np.random.default_rng(1)
        toks = rng.integers(3, 200, 20).tolist()
        kv = KVCells(model.n_ctx)
        _logits(model, kv, toks, np.arange(30, 50), 0)              # at positions 30..49
        moved = np.flatnonzero(kv.seq == 0).astype(np.int32)
        KVShifter(model.pipeline).shift(moved, np.full(moved.size, -30, np.int32))
        kv.pos[moved] -= 30
        shifted = _logits(model, kv, [42], [20], 0)
        fresh = _logits(model, kv, toks + [42], np.arange(21), 1)
        np.testing.assert_allclose(shifted, fresh, atol=tol * np.abs(fresh).max(), rtol=0)
    finally:
        model.close()


# -- the engine ---------------------------------------------------------------------------------------
def _engine(path, n_ctx, shift: bool) -> Engine:
    model = load_model(str(path), [LocalBackend()], n_ctx=n_ctx)
    eng = Engine(model, EngineConfig(n_parallel=1, warmup=False, context_shift=shift))
    eng.start()
    return eng


def _gen(eng, prompt, n, **kw) -> FinalEvent:
    last = list(eng.stream(prompt, TaskParams(sampling=GREEDY, n_predict=n, ignore_eos=True, **kw)))[-1]
    assert isinstance(last, FinalEvent), last
    return last


def test_engine_runs_past_the_slot(models, monkeypatch):
    prompt = list(range(10, 30))
    off = _engine(models / "one.gguf", 48, False)
    on = _engine(models / "one.gguf", 48, True)
    try:
        f = _gen(off, prompt, 100)
        assert f.truncated and f.n_decoded == 48 - 20 + 1 and f.stop_type == "limit"
        g = _gen(on, prompt, 100, n_keep=4)
        assert g.n_decoded == 100 and g.truncated and len(on.slots[0].cache) <= 48
        assert g.tokens[:f.n_decoded] == f.tokens
        # the kept prefix stays at the front of the slot, the cells at positions 0..n-1 (it can be saved)
        assert on.slots[0].cache[:4] == prompt[:4]
        assert on.call(lambda e: slot_file.slot_cells(e, 0)).result().size == len(on.slots[0].cache)
        # one layer: recomputing the kept tokens (a node without ROPE_SHIFT) gives the same tokens
        monkeypatch.setattr(KVShifter, "supported", lambda self: False)
        h = _gen(on, prompt, 100, n_keep=4, cache_prompt=False)
        assert h.tokens == g.tokens and h.truncated
    finally:
        for e in (off, on):
            e.stop()
            e.model.close()


def test_n_keep_discard_rule():
    from llamarpc.frontend.engine.slot import Slot
    from llamarpc.frontend.engine.task import Task

    s = Slot(0, 64)
    s.task = Task(list(range(10)), TaskParams(n_keep=-1), lambda e: None)
    s.cache = list(range(64))
    assert n_keep_discard(s, add_bos=False) == (10, 27)
    assert n_keep_discard(s, add_bos=True) == (11, 26)
    s.task.params.n_keep, s.task.params.n_discard = 100, 0
    assert n_keep_discard(s, add_bos=False) == (60, 2)
    s.task.params.n_keep, s.task.params.n_discard = 0, 5
    assert n_keep_discard(s, add_bos=False) == (0, 5)


@pytest.mark.slow
def test_real_model_shifts_past_a_tiny_context(model_path):
    eng = _engine(model_path, 128, True)
    try:
        prompt = eng.tokenizer.encode("Once upon a time, in a land far away,", add_special=True)
        f = _gen(eng, prompt, 160, n_keep=-1)
        assert f.n_decoded == 160 and f.truncated
        assert eng.slots[0].cache[:len(prompt)] == prompt and len(eng.slots[0].cache) <= 128
        assert f.content.strip()
    finally:
        eng.stop()
        eng.model.close()


def test_http_context_shift(models):
    """--context-shift over HTTP: n_predict beyond the slot runs to the end (truncated), n_keep and
    n_discard come from the request; without the flag the slot's end stops it."""
    from serverproc import start_server

    on, url = start_server(["-m", str(models / "one.gguf"), "-c", "64", "--context-shift", "--slots"])
    off, url_off = start_server(["-m", str(models / "one.gguf"), "-c", "64"])
    try:
        body = {"prompt": list(range(10, 30)), "n_predict": 120, "temperature": 0, "ignore_eos": True,
                "n_keep": 3, "n_discard": 7}
        r = httpx.post(url + "/completion", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["tokens_predicted"] == 120 and r.json()["truncated"] is True
        # 20 + 119 tokens fed through a 64-token slot, 7 dropped at each of 11 shifts
        assert r.json()["tokens_cached"] == 20 + 119 - 7 * 11
        body.pop("n_discard")   # default: half of what follows n_keep, (64 - 3) // 2 = 30, 3 shifts
        r = httpx.post(url + "/completion", json={**body, "cache_prompt": False}, timeout=60)
        assert r.json()["tokens_cached"] == 20 + 119 - 30 * 3
        r = httpx.post(url_off + "/completion", json=body, timeout=60)
        assert r.json()["tokens_predicted"] == 64 - 20 + 1 and r.json()["truncated"] is True
    finally:
        on.stop()
        off.stop()


def test_shift_leaves_the_other_slots_alone(models):
    """Two slots decoding together, one shifting past its context: each gives the tokens it gives alone."""
    model = load_model(str(models / "two.gguf"), [LocalBackend()], n_ctx=128)
    eng = Engine(model, EngineConfig(n_parallel=2, warmup=False, context_shift=True))
    eng.start()
    try:
        long_p, short_p = list(range(40, 70)), list(range(90, 100))
        alone_long = _gen(eng, long_p, 70, cache_prompt=False).tokens      # 30 + 70 > 64: shifts
        alone_short = _gen(eng, short_p, 20, cache_prompt=False).tokens
        out: dict[str, list[int]] = {}
        t = threading.Thread(target=lambda: out.setdefault("long", _gen(eng, long_p, 70, cache_prompt=False).tokens))
        t.start()
        out["short"] = _gen(eng, short_p, 20, cache_prompt=False).tokens
        t.join()
        assert out["long"] == alone_long and out["short"] == alone_short
    finally:
        eng.stop()
        model.close()
