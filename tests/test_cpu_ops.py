"""The compiled CPU ops (rpcserver/quant/ops.c through ops.py) against the reference kernels
(rpcserver/kernels.py with numpy): the same results within float32 rounding, the same cache bytes."""
from __future__ import annotations

import numpy as np
import pytest
from llamarpc.rpcserver import kernels as K
from llamarpc.rpcserver.quant import native, ops

XP = ops._NP


@pytest.fixture(scope="module", autouse=True)
def compiled():
    if ops._load() is None:
        pytest.skip("no C compiler: the ops run the reference kernels")


@pytest.fixture
def threads():
    """Set the kernels' thread count for one test, restored after."""
    before = native.threads()
    yield native.set_threads
    native.set_threads(before)


@pytest.fixture
def ctypes_addresses(monkeypatch):
    """The wrappers' portable path: data addresses from .ctypes.data instead of id()."""
    monkeypatch.setattr(ops, "_DATA_OFF", -1)
    monkeypatch.setattr(ops, "_addr", ops._ctypes_address)


# -- attention -----------------------------------------------------------------------------------

def scenario(seed, *, n_head, n_kv, d, n, m, ln, n_seq, dtype=np.float32, v_dtype=None, blind=False):
    """Caches of m cells whose first ln are visible: n_seq sequences interleaved, ~1/8 empty cells,
    stale garbage everywhere; n new tokens appended to their sequences in cells that were empty
    (tokens of one sequence see each other causally). `blind`: one more token, of a sequence no
    cell holds, written past ln, so it sees nothing."""
    rng = np.random.default_rng(seed)
    kvw = n_kv * d
    k_cache = rng.standard_normal((m, kvw)).astype(dtype)
    v_cache = rng.standard_normal((m, kvw)).astype(v_dtype or dtype)
    kv_seq = rng.integers(0, n_seq, ln).astype(np.int32)
    kv_pos = np.full(ln, -1, np.int32)
    free = [int(c) for c in rng.permutation(ln)[:n - blind]]   # the new tokens' cells, empty until now
    nxt = [0] * n_seq
    for c in range(ln):
        if c in free or rng.random() < 0.125:
            continue
        s = int(kv_seq[c])
        kv_pos[c], nxt[s] = nxt[s], nxt[s] + 1
    cells, tok_pos, tok_seq = [], [], []
    for t in range(n - blind):
        s = int(rng.integers(0, n_seq))
        c = free[t]
        kv_pos[c], kv_seq[c] = nxt[s], s
        cells.append(c), tok_pos.append(nxt[s]), tok_seq.append(s)
        nxt[s] += 1
    if blind:
        cells.append(m - 1), tok_pos.append(3), tok_seq.append(n_seq + 5)
    q = rng.standard_normal((n, n_head * d)).astype(np.float32)
    k = rng.standard_normal((n, kvw)).astype(np.float32)
    v = rng.standard_normal((n, kvw)).astype(np.float32)
    i32 = lambda a: np.asarray(a, np.int32)  # noqa: E731
    return q, k, v, k_cache, v_cache, i32(cells), i32(tok_pos), i32(tok_seq), kv_pos, kv_seq


def run_both(args, **kw):
    """(compiled out, its caches), (reference out, its caches), each on its own copy of the caches."""
    q, k, v, kc, vc, *rest = args
    kc1, vc1, kc2, vc2 = kc.copy(), vc.copy(), kc.copy(), vc.copy()
    got = ops.attention(q, k, v, kc1, vc1, *rest, **kw)
    want = K.attention(XP, q, k, v, kc2, vc2, *rest, **kw)
    return (got, kc1, vc1), (np.asarray(want), kc2, vc2)


def assert_same(got, want):
    (o1, kc1, vc1), (o2, kc2, vc2) = got, want
    assert o1.dtype == np.float32 and o1.shape == o2.shape
    np.testing.assert_allclose(o1, o2, rtol=1e-5, atol=1e-6)
    for a, b in ((kc1, kc2), (vc1, vc2)):   # bit-exact, f16 included
        assert a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))


CASES = {
    # name: (scenario kwargs, attention kwargs)
    "decode-gqa": (dict(n_head=8, n_kv=2, d=64, n=1, m=96, ln=80, n_seq=3), {}),
    "prefill-gqa": (dict(n_head=8, n_kv=2, d=64, n=7, m=96, ln=80, n_seq=3), {}),
    "odd-dim": (dict(n_head=8, n_kv=2, d=24, n=7, m=64, ln=50, n_seq=2), {}),
    "scalar-dim": (dict(n_head=6, n_kv=3, d=20, n=5, m=64, ln=40, n_seq=2), {}),
    "f16": (dict(n_head=8, n_kv=2, d=64, n=7, m=96, ln=80, n_seq=3, dtype=np.float16), {}),
    "f16-decode": (dict(n_head=9, n_kv=3, d=64, n=1, m=64, ln=50, n_seq=1, dtype=np.float16), {}),
    "f16-k-f32-v": (dict(n_head=4, n_kv=4, d=24, n=3, m=40, ln=30, n_seq=2, dtype=np.float16, v_dtype=np.float32), {}),
    "f16-scalar": (dict(n_head=4, n_kv=2, d=20, n=3, m=40, ln=30, n_seq=2, dtype=np.float16), {}),
    "window": (dict(n_head=8, n_kv=2, d=64, n=7, m=96, ln=80, n_seq=2), dict(sliding_window=9)),
    "softcap": (dict(n_head=8, n_kv=2, d=64, n=7, m=96, ln=80, n_seq=2), dict(softcap_=1.5)),
    "window-softcap-f16": (dict(n_head=8, n_kv=1, d=24, n=4, m=64, ln=60, n_seq=2, dtype=np.float16),
                           dict(sliding_window=5, softcap_=3.0)),
    "blind-token": (dict(n_head=8, n_kv=2, d=64, n=4, m=64, ln=40, n_seq=2, blind=True), {}),
    "blind-decode": (dict(n_head=4, n_kv=2, d=24, n=1, m=16, ln=8, n_seq=1, blind=True), {}),
    "non-causal": (dict(n_head=8, n_kv=2, d=64, n=7, m=96, ln=80, n_seq=3), dict(causal=False)),
    "non-causal-f16-softcap": (dict(n_head=4, n_kv=4, d=24, n=5, m=40, ln=30, n_seq=2, dtype=np.float16),
                               dict(causal=False, softcap_=2.0)),
    "non-causal-blind": (dict(n_head=4, n_kv=2, d=64, n=4, m=64, ln=40, n_seq=2, blind=True), dict(causal=False)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_attention_matches_reference(name):
    sc, kw = CASES[name]
    args = scenario(list(CASES).index(name), **sc)
    got, want = run_both(args, n_head=sc["n_head"], n_head_kv=sc["n_kv"], head_dim=sc["d"], scale=sc["d"] ** -0.5, **kw)
    assert_same(got, want)
    if kw.get("causal") is False:   # the mask did change: a causal run differs
        causal, _ = run_both(args, n_head=sc["n_head"], n_head_kv=sc["n_kv"], head_dim=sc["d"], scale=sc["d"] ** -0.5,
                             **{**kw, "causal": True})
        assert np.abs(causal[0] - got[0]).max() > 1e-3
    if sc.get("blind"):
        assert not got[0][-1].any()   # a token that sees no cell gets zeros, as in the reference


def test_attention_without_cells_acts_as_the_reference():
    q, k, v, kc, vc, *rest = scenario(2, n_head=4, n_kv=2, d=24, n=1, m=16, ln=0, n_seq=1, blind=True)
    kw = dict(n_head=4, n_head_kv=2, head_dim=24, scale=0.2)
    with pytest.raises(ValueError) as want:
        K.attention(XP, q, k, v, kc.copy(), vc.copy(), *rest, **kw)
    with pytest.raises(type(want.value)):
        ops.attention(q, k, v, kc, vc, *rest, **kw)
    empty = [np.zeros(0, np.int32)] * 3
    out = ops.attention(q[:0], k[:0], v[:0], kc, vc, *empty, *rest[3:], **kw)   # no tokens: nothing to do
    assert out.shape == (0, 96)


@pytest.mark.parametrize("d", [64, 20])
def test_attention_nan_spreads_as_in_the_reference(d):
    q, k, v, kc, vc, *rest = scenario(9, n_head=4, n_kv=2, d=d, n=3, m=40, ln=30, n_seq=1)
    q[1, 5] = np.nan
    (got, *_), (want, *_) = run_both((q, k, v, kc, vc, *rest), n_head=4, n_head_kv=2, head_dim=d, scale=0.2)
    assert np.isnan(want).any() and np.array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_attention_portable_addresses(ctypes_addresses):
    args = scenario(3, n_head=8, n_kv=2, d=64, n=3, m=64, ln=40, n_seq=2, dtype=np.float16)
    assert_same(*run_both(args, n_head=8, n_head_kv=2, head_dim=64, scale=0.125))


def test_attention_strided_cache_views():
    """Caches that are row-strided views of a wider buffer are written in place."""
    q, k, v, kc, vc, *rest = scenario(4, n_head=4, n_kv=2, d=24, n=3, m=40, ln=30, n_seq=2)
    wide_k, wide_v = np.zeros((40, 80), np.float32), np.zeros((40, 80), np.float32)
    wide_k[:, 8:56], wide_v[:, 8:56] = kc, vc
    kcv, vcv = wide_k[:, 8:56], wide_v[:, 8:56]
    assert not kcv.flags.c_contiguous
    got = ops.attention(q, k, v, kcv, vcv, *rest, n_head=4, n_head_kv=2, head_dim=24, scale=0.2)
    want = K.attention(XP, q, k, v, kc, vc, *rest, n_head=4, n_head_kv=2, head_dim=24, scale=0.2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.array_equal(kcv, kc) and np.array_equal(vcv, vc)
    assert not wide_k[:, :8].any() and not wide_k[:, 56:].any()


def test_attention_repeated_cell_keeps_last_row():
    q, k, v, kc, vc, cells, tok_pos, tok_seq, kv_pos, kv_seq = scenario(5, n_head=2, n_kv=1, d=24, n=3, m=20, ln=10,
                                                                        n_seq=1)
    cells = np.array([15, 15, 16], np.int32)
    assert_same(*run_both((q, k, v, kc, vc, cells, tok_pos, tok_seq, kv_pos, kv_seq), n_head=2, n_head_kv=1,
                          head_dim=24, scale=0.2))


def test_attention_shape_errors():
    q, k, v, kc, vc, cells, *rest = scenario(6, n_head=4, n_kv=2, d=24, n=2, m=20, ln=10, n_seq=1)
    kw = dict(n_head=4, n_head_kv=2, head_dim=24, scale=0.2)
    before = kc.copy()
    for bad in (np.array([3, 20], np.int32), np.array([-1, 3], np.int32)):
        with pytest.raises(K.ShapeError, match=r"cells must be in \[0, 20\)"):
            ops.attention(q, k, v, kc, vc, bad, *rest, **kw)
    assert np.array_equal(kc, before)   # nothing written
    with pytest.raises(K.ShapeError, match="q must be"):
        ops.attention(q[:, :-1], k, v, kc, vc, cells, *rest, **kw)
    with pytest.raises(K.ShapeError, match="k must be"):
        ops.attention(q, k[:1], v, kc, vc, cells, *rest, **kw)
    with pytest.raises(K.ShapeError, match="visible cells"):
        ops.attention(q, k, v, kc[:5], vc[:5], cells, *rest[:2], np.zeros(6, np.int32), np.zeros(6, np.int32), **kw)


@pytest.mark.parametrize("n", [2, 7])   # 2: the threads split each kv head's group of query heads
def test_attention_threads_agree(threads, n):
    args = scenario(7, n_head=8, n_kv=2, d=64, n=n, m=160, ln=150, n_seq=2, dtype=np.float16)
    kw = dict(n_head=8, n_head_kv=2, head_dim=64, scale=0.125)
    outs = []
    for nt in (1, 3):
        threads(nt)
        q, k, v, kc, vc, *rest = args
        outs.append(ops.attention(q, k, v, kc.copy(), vc.copy(), *rest, **kw))
    assert np.array_equal(outs[0], outs[1])


# -- rope ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [0, 2])
@pytest.mark.parametrize("head_dim,n_dims,freq_base,freq_scale", [(64, 64, 10000.0, 1.0), (64, 32, 10000.0, 1.0),
                                                                  (24, 16, 500000.0, 0.25), (32, 0, 10000.0, 1.0)])
def test_rope_matches_reference(mode, head_dim, n_dims, freq_base, freq_scale):
    rng = np.random.default_rng(head_dim + n_dims + mode)
    x = rng.standard_normal((5, 3 * head_dim)).astype(np.float32)
    pos = np.array([0, 1, 17, 4095, 100_000], np.int32)
    want = np.asarray(K.rope(XP, x, pos, head_dim, n_dims, mode, freq_base, freq_scale))
    got = ops.rope(x, pos, head_dim, n_dims, mode, freq_base, freq_scale)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    y = x.copy()
    assert ops.rope(y, pos, head_dim, n_dims, mode, freq_base, freq_scale, out=y) is y   # in place
    np.testing.assert_array_equal(y, got)


def test_rope_errors_and_portable_path(ctypes_addresses):
    x = np.ones((2, 10), np.float32)
    with pytest.raises(K.ShapeError, match="multiple of head_dim"):
        ops.rope(x, np.zeros(2, np.int32), 4, 4, 0, 10000.0, 1.0)
    with pytest.raises(K.ShapeError, match="pos must be"):
        ops.rope(x, np.zeros(3, np.int32), 5, 4, 0, 10000.0, 1.0)
    x = np.random.default_rng(1).standard_normal((3, 128)).astype(np.float32)
    pos = np.array([5, 6, 7], np.int32)
    np.testing.assert_allclose(ops.rope(x, pos, 64, 64, 2, 10000.0, 1.0), K.rope(XP, x, pos, 64, 64, 2, 10000.0, 1.0),
                               rtol=1e-6, atol=1e-6)


def test_rope_threads_agree(threads):
    x = np.random.default_rng(2).standard_normal((64, 576)).astype(np.float32)
    pos = np.arange(64, dtype=np.int32) * 7
    outs = []
    for n in (1, 3):
        threads(n)
        outs.append(ops.rope(x, pos, 64, 64, 0, 10000.0, 1.0))
    assert np.array_equal(outs[0], outs[1])


# -- rms_norm ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 576), (5, 576), (2, 3, 16), (4, 7)])
@pytest.mark.parametrize("with_w", [False, True])
def test_rms_norm_matches_reference(shape, with_w):
    rng = np.random.default_rng(len(shape) + shape[-1])
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    w = rng.standard_normal(shape[-1]).astype(np.float32) if with_w else None
    want = np.asarray(K.rms_norm(XP, x, 1e-6))
    if with_w:
        want = want * w
    got = ops.rms_norm(x, 1e-6, w)
    assert got.shape == x.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_rms_norm_is_bit_exact():
    """The mean is summed in numpy's pairwise order, so the fused norm equals the reference's bits
    (and a fused norm+mul the unfused pair's)."""
    rng = np.random.default_rng(5)
    for k in (5, 8, 100, 129, 576, 2048, 4097):
        x = (rng.standard_normal((6, k)) * 3).astype(np.float32)
        w = rng.standard_normal(k).astype(np.float32)
        want = np.asarray(K.rms_norm(XP, x, 1e-5))
        np.testing.assert_array_equal(ops.rms_norm(x, 1e-5), want)
        np.testing.assert_array_equal(ops.rms_norm(x, 1e-5, w), want * w)


def test_rms_norm_weight_broadcast_and_portable_path(ctypes_addresses):
    x = np.random.default_rng(3).standard_normal((3, 8)).astype(np.float32)
    w = np.arange(8, dtype=np.float32).reshape(1, 8)
    np.testing.assert_allclose(ops.rms_norm(x, 1e-5, w), K.rms_norm(XP, x, 1e-5) * w, rtol=1e-6, atol=1e-7)
    with pytest.raises(K.ShapeError, match="do not broadcast"):
        ops.rms_norm(x, 1e-5, np.ones(5, np.float32))


def test_rms_norm_threads_agree(threads):
    x = np.random.default_rng(4).standard_normal((64, 576)).astype(np.float32)
    outs = []
    for n in (1, 3):
        threads(n)
        outs.append(ops.rms_norm(x, 1e-5))
    assert np.array_equal(outs[0], outs[1])


# -- arrays as the node receives them --------------------------------------------------------------

def wire(a):
    """As the proto decoder hands an input over: read-only, with a '<' dtype equal to (not the same
    object as) numpy's native one."""
    a = np.ascontiguousarray(a)
    return np.frombuffer(a.tobytes(), dtype=a.dtype.newbyteorder("<")).astype(a.dtype, copy=False).reshape(a.shape)


def test_wire_arrays_take_the_compiled_path(monkeypatch):
    q, k, v, kc, vc, *ints = scenario(10, n_head=8, n_kv=2, d=64, n=3, m=64, ln=40, n_seq=2, dtype=np.float16)
    kw = dict(n_head=8, n_head_kv=2, head_dim=64, scale=0.125)
    (_, kc1, vc1), want = run_both((q, k, v, kc, vc, *ints), **kw)
    x = np.random.default_rng(6).standard_normal((3, 512)).astype(np.float32)
    pos = np.array([4, 5, 900], np.int32)
    want_rope = np.asarray(K.rope(XP, x, pos, 64, 32, 2, 10000.0, 1.0))
    want_rms = np.asarray(K.rms_norm(XP, x, 1e-5))

    def reference(*a, **kw):
        raise AssertionError("took the reference path")

    monkeypatch.setattr(ops, "_ref_attention", reference)
    monkeypatch.setattr(K, "rope", reference)
    monkeypatch.setattr(K, "rms_norm", reference)
    kc2, vc2 = kc.copy(), vc.copy()
    assert wire(ints[0]).dtype is not np.dtype(np.int32) and not wire(q).flags.writeable
    out = ops.attention(wire(q), wire(k), wire(v), kc2, vc2, *(wire(a) for a in ints), **kw)
    assert_same((out, kc2, vc2), want)
    np.testing.assert_allclose(ops.rope(wire(x), wire(pos), 64, 32, 2, 10000.0, 1.0), want_rope, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ops.rms_norm(wire(x), 1e-5), want_rms)


# -- without a compiler --------------------------------------------------------------------------

def test_reference_fallback(monkeypatch):
    monkeypatch.setattr(ops, "_lib", None)
    monkeypatch.setattr(ops, "_ready", True)
    args = scenario(8, n_head=4, n_kv=2, d=24, n=2, m=20, ln=10, n_seq=1)
    q, k, v, kc, vc, *rest = args
    out = ops.attention(q, k, v, kc, vc, *rest, n_head=4, n_head_kv=2, head_dim=24, scale=0.2)
    assert out.shape == (2, 96)
    x = np.ones((2, 8), np.float32)
    np.testing.assert_array_equal(ops.rms_norm(x, 0.0), np.ones((2, 8), np.float32))
    np.testing.assert_array_equal(ops.rope(x, np.zeros(2, np.int32), 8, 8, 0, 10000.0, 1.0), x)


# -- swiglu --------------------------------------------------------------------------------------

def test_swiglu_matches_reference():
    rng = np.random.default_rng(5)
    g = np.concatenate([rng.standard_normal(4093).astype(np.float32) * 6,
                        np.array([0.0, -0.0, 1e-30, -1e-30, 40, -40, 87, -87, 88.5, -88.5, 200, -200, 1e38, -1e38],
                                 np.float32)])
    u = rng.standard_normal(g.size).astype(np.float32)
    got, want = ops.swiglu(g, u), K.swiglu(XP, g, u)
    assert got.dtype == np.float32 and got.shape == g.shape
    # the kernel's exp form is within a few ulp of the float64 truth ...
    g64, u64 = g.astype(np.float64), u.astype(np.float64)
    with np.errstate(over="ignore"):
        truth = g64 / (1.0 + np.exp(-g64)) * u64
    np.testing.assert_allclose(got, truth, rtol=2e-6, atol=1e-36)
    # ... where the reference's tanh form, 0.5 * (1 + tanh(g/2)), cancels for negative g: its
    # error is a few ulp of 1 times |g u|, not of the result
    assert np.all(np.abs(got.astype(np.float64) - want) <= 1e-6 * np.abs(g64 * u64) + 1e-36)
    # 2-d, and a view that is not contiguous goes through a contiguous copy
    g2, u2 = g[:4096].reshape(64, 64), u[:4096].reshape(64, 64)
    np.testing.assert_array_equal(ops.swiglu(g2.T, u2.T), ops.swiglu(np.ascontiguousarray(g2.T), np.ascontiguousarray(u2.T)))


def test_swiglu_off_the_fast_path_is_the_reference():
    g = np.ones((2, 3), np.float64)
    np.testing.assert_array_equal(ops.swiglu(g, g), K.swiglu(XP, g, g))
    with pytest.raises(K.ShapeError):
        ops.swiglu(np.ones((2, 3), np.float32), np.ones((3, 2), np.float32))
