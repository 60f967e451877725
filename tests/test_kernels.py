"""Every kernel against a plain numpy reference, under numpy and again under array-api-strict
(code that passes there uses nothing numpy-only, so cupy can run it)."""
from __future__ import annotations

import math

import array_api_strict
import numpy as np
import pytest
from array_api_compat import array_namespace
from llamarpc.rpcserver import kernels as K

NAMESPACES = ["numpy", "strict"]


def ns(name):
    return array_namespace(np.empty(0)) if name == "numpy" else array_api_strict


def to(xp, a):
    return xp.asarray(np.asarray(a))


def host(a):
    try:
        return np.asarray(a)
    except Exception:  # array-api-strict refuses implicit conversion in some versions
        return np.from_dlpack(a)


RNG = np.random.default_rng(0)


@pytest.mark.parametrize("name", NAMESPACES)
def test_norms(name):
    xp = ns(name)
    x = RNG.standard_normal((5, 16)).astype(np.float32)
    ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(host(K.rms_norm(xp, to(xp, x), 1e-5)), ref, rtol=1e-5, atol=1e-6)
    mu = x.mean(-1, keepdims=True)
    ref = (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(host(K.layer_norm(xp, to(xp, x), 1e-5)), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMESPACES)
def test_elementwise_and_matmul(name):
    xp = ns(name)
    x = RNG.standard_normal((4, 8)).astype(np.float32) * 30
    w = RNG.standard_normal((6, 8)).astype(np.float32)
    np.testing.assert_allclose(host(K.matmul(xp, to(xp, x), to(xp, w))), x @ w.T, rtol=1e-5, atol=1e-4)
    sig = np.array([1 / (1 + math.exp(-v)) for v in x.ravel().astype(np.float64)]).reshape(x.shape)
    np.testing.assert_allclose(host(K.silu(xp, to(xp, x))), x * sig, rtol=1e-5, atol=1e-6)
    g = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(host(K.gelu(xp, to(xp, x))), g, rtol=1e-5, atol=1e-5)
    y = RNG.standard_normal((4, 8)).astype(np.float32)
    np.testing.assert_allclose(host(K.swiglu(xp, to(xp, x), to(xp, y))), x * sig * y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(host(K.add(xp, to(xp, x), to(xp, y[0]))), x + y[0])
    np.testing.assert_allclose(host(K.mul(xp, to(xp, x), to(xp, y[0]))), x * y[0])
    e = np.exp(x - x.max(-1, keepdims=True))
    np.testing.assert_allclose(host(K.softmax(xp, to(xp, x))), e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(host(K.softcap(xp, to(xp, x), 5.0)), 5 * np.tanh(x / 5), rtol=1e-5, atol=1e-6)
    ids = np.array([3, 0, 3], dtype=np.int32)
    np.testing.assert_array_equal(host(K.get_rows(xp, to(xp, x), to(xp, ids))), x[ids])
    with pytest.raises(K.ShapeError):
        K.matmul(xp, to(xp, x), to(xp, w.T.copy()))
    with pytest.raises(K.ShapeError):
        K.get_rows(xp, to(xp, x), to(xp, np.array([4], dtype=np.int32)))


def rope_ref(x, pos, head_dim, n_dims, mode, base, scale):
    n, width = x.shape
    out = x.astype(np.float64).reshape(n, -1, head_dim).copy()
    src = out.copy()
    for t in range(n):
        for i in range(n_dims // 2):
            th = scale * pos[t] * base ** (-2 * i / n_dims)
            a, b = (i, i + n_dims // 2) if mode == 2 else (2 * i, 2 * i + 1)
            out[t, :, a] = src[t, :, a] * math.cos(th) - src[t, :, b] * math.sin(th)
            out[t, :, b] = src[t, :, a] * math.sin(th) + src[t, :, b] * math.cos(th)
    return out.reshape(n, width)


@pytest.mark.parametrize("name", NAMESPACES)
@pytest.mark.parametrize("mode,n_dims,scale", [(0, 16, 1.0), (2, 16, 1.0), (0, 8, 0.5), (2, 12, 0.25)])
def test_rope(name, mode, n_dims, scale):
    xp = ns(name)
    x = RNG.standard_normal((5, 3 * 16)).astype(np.float32)
    pos = np.array([0, 1, 7, 100, 4095], dtype=np.int32)
    got = host(K.rope(xp, to(xp, x), to(xp, pos), 16, n_dims, mode, 10000.0, scale))
    np.testing.assert_allclose(got, rope_ref(x, pos, 16, n_dims, mode, 10000.0, scale), rtol=1e-5, atol=1e-5)


def attention_ref(q, k_all, v_all, tok_pos, tok_seq, kv_pos, kv_seq, n_head, n_head_kv, hd, window=0, cap=0.0,
                  causal=True):
    n = q.shape[0]
    g = n_head // n_head_kv
    out = np.zeros((n, n_head * hd))
    for t in range(n):
        for h in range(n_head):
            kh = h // g
            scores, vals = [], []
            for c in range(len(kv_pos)):
                ok = kv_seq[c] == tok_seq[t] and 0 <= kv_pos[c] and (kv_pos[c] <= tok_pos[t] or not causal)
                if window:
                    ok = ok and tok_pos[t] - kv_pos[c] < window
                if ok:
                    s = float(q[t, h * hd:(h + 1) * hd] @ k_all[c, kh * hd:(kh + 1) * hd]) / math.sqrt(hd)
                    scores.append(cap * math.tanh(s / cap) if cap else s)
                    vals.append(v_all[c, kh * hd:(kh + 1) * hd])
            p = np.exp(np.array(scores) - max(scores))
            p /= p.sum()
            out[t, h * hd:(h + 1) * hd] = p @ np.array(vals)
    return out


@pytest.mark.parametrize("name", NAMESPACES)
@pytest.mark.parametrize("window,cap,causal", [(0, 0.0, True), (3, 0.0, True), (0, 2.0, True), (0, 0.0, False),
                                               (0, 2.0, False)])
def test_attention_writes_cache_and_masks(name, window, cap, causal):
    xp = ns(name)
    n_head, n_head_kv, hd, m = 4, 2, 8, 16
    # two sequences: seq 0 has 4 old cells, seq 1 has 2; this step adds 2 tokens to each
    old_pos = np.array([0, 1, 2, 3, 0, 1], dtype=np.int32)
    old_seq = np.array([0, 0, 0, 0, 1, 1], dtype=np.int32)
    kc = np.zeros((m, n_head_kv * hd), np.float32)
    vc = np.zeros((m, n_head_kv * hd), np.float32)
    kc[:6] = RNG.standard_normal((6, n_head_kv * hd))
    vc[:6] = RNG.standard_normal((6, n_head_kv * hd))
    cells = np.array([9, 6, 7, 8], dtype=np.int32)  # not contiguous: exercises the general write
    tok_pos = np.array([4, 5, 2, 3], dtype=np.int32)
    tok_seq = np.array([0, 0, 1, 1], dtype=np.int32)
    kv_pos = np.full(10, -1, np.int32)
    kv_seq = np.full(10, -1, np.int32)
    kv_pos[:6], kv_seq[:6] = old_pos, old_seq
    kv_pos[cells], kv_seq[cells] = tok_pos, tok_seq
    q = RNG.standard_normal((4, n_head * hd)).astype(np.float32)
    k = RNG.standard_normal((4, n_head_kv * hd)).astype(np.float32)
    v = RNG.standard_normal((4, n_head_kv * hd)).astype(np.float32)
    k_all, v_all = kc.copy(), vc.copy()
    k_all[cells], v_all[cells] = k, v
    ref = attention_ref(q, k_all, v_all, tok_pos, tok_seq, kv_pos, kv_seq, n_head, n_head_kv, hd, window, cap, causal)
    if not causal:   # the first token of each sequence sees its later ones: not what the causal mask gives
        causal_ref = attention_ref(q, k_all, v_all, tok_pos, tok_seq, kv_pos, kv_seq, n_head, n_head_kv, hd, window, cap)
        assert np.abs(causal_ref - ref).max() > 1e-2
    xkc, xvc = to(xp, kc), to(xp, vc)
    got = K.attention(xp, to(xp, q), to(xp, k), to(xp, v), xkc, xvc, to(xp, cells), to(xp, tok_pos),
                      to(xp, tok_seq), to(xp, kv_pos), to(xp, kv_seq), n_head=n_head, n_head_kv=n_head_kv,
                      head_dim=hd, scale=hd ** -0.5, sliding_window=window, softcap_=cap, causal=causal)
    np.testing.assert_allclose(host(got), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(host(xkc)[cells], k)
    np.testing.assert_array_equal(host(xvc)[cells], v)


@pytest.mark.parametrize("name", NAMESPACES)
def test_pool(name):
    xp = ns(name)
    x = RNG.standard_normal((5, 3)).astype(np.float32)
    seq = np.array([0, 0, 1, 1, 1], dtype=np.int32)
    mean = host(K.pool(xp, to(xp, x), to(xp, seq), 1, 2))
    np.testing.assert_allclose(mean, np.stack([x[:2].mean(0), x[2:].mean(0)]), rtol=1e-6)
    np.testing.assert_array_equal(host(K.pool(xp, to(xp, x), to(xp, seq), 2, 2)), x[[0, 2]])
    np.testing.assert_array_equal(host(K.pool(xp, to(xp, x), to(xp, seq), 3, 2)), x[[1, 4]])
