"""The compiled quantized kernels (rpcserver/quant: kernels.c through native.py) against the numpy
oracle (quant/reference.py: gguf-py dequantize + BLAS), for every GGML type a node multiplies by.

Bounds used below, all computed in float64 from the float64 truth  x @ W.T  (W = gguf-py's
dequantized weights, which the kernels must reproduce bit for bit up to 1 ulp):
- float32 rounding of a k-term dot product: |err| <= ROUND * sqrt(k) * 2**-24 * (|x| @ |W|.T)
  (+ a denormal-sized atol), ROUND = 4. For k <= 16 that covers the worst case k * 2**-24; for
  larger k the worst case is never approached by blocked / SIMD / BLAS sums, whose rounding errors
  add like a random walk (the largest measured here is under 0.3 of the bound), while a kernel that
  skips the 8-bit rounding, or gets one block's scale wrong, lands several times above it.
- "fast" mode (activations rounded to 8 bits per 32 values, d = max|x over the block| / 127): each
  activation moves by at most d/2, so  |fast - exact| <= sum_k |W[r, k]| * d(x_k)/2  (+ rounding).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from llamarpc.rpcserver import quant
from llamarpc.rpcserver.quant import native, reference
from synth import make_weight

TYPES = list(quant.TYPES)
FLOATS = [T.F32, T.F16, T.BF16]
QUANTS = [t for t in TYPES if t not in FLOATS]
MS = [1, 7, 37]                     # odd row counts; 37 rows span two BLAS tiles on 2 threads
NS = [1, 2, 3, 4, 5, 7, 8, 9, quant.GEMV_MAX_ROWS, 40]   # groups of 4 and the tails; 40 = the tile + BLAS path
ROUND = 4.0
U = 2.0 ** -24                      # float32 unit roundoff
SEED = 1234


def ks(t: T) -> list[int]:
    block = quant.TYPES[t].block
    if block == 256:
        return [256, 512]
    if block == 32:
        return [32, 96, 544]
    return [5, 96]


def cases(with_n: bool) -> list:
    out = []
    for t in TYPES:
        for m in MS:
            for k in ks(t):
                if with_n:
                    out += [pytest.param(t, m, k, n, id=f"{t.name}-m{m}-k{k}-n{n}") for n in NS]
                else:
                    out.append(pytest.param(t, m, k, id=f"{t.name}-m{m}-k{k}"))
    return out


def rng_for(*key) -> np.random.Generator:
    return np.random.default_rng([SEED, *(int(v) for v in key)])


def weight(t: T, m: int, k: int) -> tuple[quant.QWeight, np.ndarray]:
    """A random stored weight and its float32 dequantization by gguf-py."""
    raw = make_weight(rng_for(t, m, k), (m, k), t)
    return quant.QWeight(raw, t, m, k), reference.dequantize(raw, t, k)


def activations(n: int, k: int, seed: int = 0) -> np.ndarray:
    x = (rng_for(n, k, seed).standard_normal((n, k)) * 1.5).astype(np.float32)
    if n and k >= 64:
        x[0, 32:64] = 0.0           # an all-zero 32-block: the fast path's d = 0 branch
    return x


def rounding(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The float32 rounding bound of x @ w.T (see the module docstring)."""
    k = x.shape[1]
    mag = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T
    return ROUND * math.sqrt(k) * U * mag + 1e-30


def truth(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) @ w.astype(np.float64).T


def assert_within(got: np.ndarray, want: np.ndarray, bound: np.ndarray, what: str) -> None:
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert got.dtype == np.float32, (what, got.dtype)
    err = np.abs(got.astype(np.float64) - want)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), (f"{what}: |err| {err[worst]:.3e} > bound {bound[worst]:.3e} at {worst}; "
                                  f"max err/bound {np.max(err / bound):.3f}")


def q8_rounded(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x after fast mode's 8-bit rounding (float32), and each element's d/2 (float64)."""
    q, d = reference.quantize_q8(x)
    n, k = x.shape
    xr = (q.reshape(n, -1, 32).astype(np.float32) * d[..., None]).reshape(n, k)
    half = np.repeat(d.astype(np.float64), 32, axis=1) / 2
    return xr, half


def needs_native():
    """The compiled library, or skip: without it the tests below would only re-test the fallback,
    which test_fallback_* cover (with its own semantics for fast mode: see there)."""
    lib = native.load()
    if lib is None:
        pytest.skip("no compiled kernels on this machine (no C compiler, or LLAMARPC_NO_NATIVE)")
    return lib


# ---- dequantization -------------------------------------------------------------------------


@pytest.mark.parametrize("t,m,k", cases(with_n=False))
def test_dequantize_and_gather(t, m, k):
    needs_native()
    w, ref = weight(t, m, k)
    tol = dict(rtol=1e-6, atol=1e-30)
    full = quant.dequantize_rows(w, 0, m)
    assert full.shape == (m, k) and full.dtype == np.float32
    np.testing.assert_allclose(full, ref, **tol)
    for r0, r1 in ((m // 2, m), (m - 1, m), (0, (m + 1) // 2)):
        np.testing.assert_allclose(quant.dequantize_rows(w, r0, r1), ref[r0:r1], **tol)
    out = np.full((m, k), np.nan, np.float32)
    assert quant.dequantize_rows(w, 0, m, out=out) is out
    np.testing.assert_allclose(out, ref, **tol)
    ids = np.array([m - 1, 0, m // 2, m - 1, 0, m // 3, m // 2], np.int64)   # repeated, out of order
    got = quant.gather_rows(w, ids)
    assert got.shape == (len(ids), k) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref[ids], **tol)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_gather_no_rows(t):
    needs_native()
    w, _ = weight(t, 7, ks(t)[0])
    got = quant.gather_rows(w, np.zeros(0, np.int32))
    assert got.shape == (0, w.k) and got.dtype == np.float32


# ---- matmul ---------------------------------------------------------------------------------


@pytest.mark.parametrize("t,m,k,n", cases(with_n=True))
def test_matmul(t, m, k, n):
    needs_native()
    w, ref = weight(t, m, k)
    x = activations(n, k)
    want = truth(x, ref)
    tol = rounding(x, ref)

    exact = quant.matmul(x, w, "exact")
    assert_within(exact, want, tol, "exact vs float64 reference")

    refmode = quant.matmul(x, w, "reference")
    np.testing.assert_array_equal(refmode, reference.matmul(x, w.raw, t, m, k))
    assert_within(refmode, want, tol, "reference mode vs float64 reference")

    fast = quant.matmul(x, w, "fast")
    if t in FLOATS or n > quant.GEMV_MAX_ROWS:
        # no 8-bit kernel for float weights; large batches go through float tiles + BLAS
        np.testing.assert_array_equal(fast, exact)
        return
    xr, half = q8_rounded(x)
    np.testing.assert_array_equal(fast, quant.matmul(x, w, "fast"))   # deterministic
    assert_within(fast, truth(xr, ref), rounding(xr, ref), "fast vs reference.matmul_fast (float64)")
    assert_within(fast, reference.matmul_fast(x, w.raw, t, m, k).astype(np.float64),
                  rounding(xr, ref) * 2, "fast vs reference.matmul_fast")
    act = half @ np.abs(ref.astype(np.float64)).T              # the 8-bit activation rounding
    assert_within(fast, want, act * (1 + 1e-5) + tol + rounding(xr, ref), "fast vs exact (8-bit bound)")


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("mode", quant.MODES)
def test_matmul_no_rows(t, mode):
    needs_native()
    for m in (1, 7):
        w, _ = weight(t, m, ks(t)[-1])
        got = quant.matmul(np.zeros((0, w.k), np.float32), w, mode)
        assert got.shape == (0, m) and got.dtype == np.float32


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_matmul_input_layout(t):
    """float64 and non-contiguous activations are taken as float32 values."""
    needs_native()
    w, _ = weight(t, 7, ks(t)[-1])
    x = activations(10, 2 * w.k, seed=1).astype(np.float64)[::2, ::2]
    x32 = np.ascontiguousarray(x, np.float32)
    for n in (3, 5):
        for mode in ("exact", "fast"):
            np.testing.assert_array_equal(quant.matmul(x[:n], w, mode), quant.matmul(x32[:n], w, mode))


# ---- without the compiled library ----------------------------------------------------------


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_fallback_without_library(t, monkeypatch):
    monkeypatch.setattr(quant.native, "load", lambda: None)
    m, k = 7, ks(t)[-1]
    w, ref = weight(t, m, k)
    for n in (1, 5, 40):
        x = activations(n, k)
        want = reference.matmul(x, w.raw, t, m, k)
        np.testing.assert_array_equal(quant.matmul(x, w, "exact"), want)
        np.testing.assert_array_equal(quant.matmul(x, w, "reference"), want)
        fast = quant.matmul(x, w, "fast")
        if t in FLOATS or n > quant.GEMV_MAX_ROWS:   # as the compiled path: 8-bit rounding only in the gemv sizes
            np.testing.assert_array_equal(fast, want)
        else:
            np.testing.assert_array_equal(fast, reference.matmul_fast(x, w.raw, t, m, k))
        assert_within(quant.matmul(x, w, "exact"), truth(x, ref), rounding(x, ref), "fallback exact")
    ids = np.array([m - 1, 0, 3, 0], np.int32)
    np.testing.assert_array_equal(quant.gather_rows(w, ids), ref[ids])
    np.testing.assert_array_equal(quant.dequantize_rows(w, 2, m), ref[2:])


@pytest.mark.parametrize("t,mode", [pytest.param(t, mode, id=f"{t.name}-{mode}") for t in TYPES for mode in quant.MODES])
def test_fallback_no_rows(t, mode, monkeypatch):
    monkeypatch.setattr(quant.native, "load", lambda: None)
    w, _ = weight(t, 7, ks(t)[-1])
    got = quant.matmul(np.zeros((0, w.k), np.float32), w, mode)
    assert got.shape == (0, 7) and got.dtype == np.float32


@pytest.mark.parametrize("t", [pytest.param(t, id=t.name) for t in TYPES])
def test_fallback_gather_no_rows(t, monkeypatch):
    monkeypatch.setattr(quant.native, "load", lambda: None)
    w, _ = weight(t, 7, ks(t)[-1])
    for got in (quant.gather_rows(w, np.zeros(0, np.int32)), quant.dequantize_rows(w, 3, 3)):
        assert got.shape == (0, w.k) and got.dtype == np.float32


def test_no_native_env(monkeypatch):
    """LLAMARPC_NO_NATIVE=1 makes load() give None (its cached answer is restored afterwards)."""
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setenv("LLAMARPC_NO_NATIVE", "1")
    assert native.load() is None
    w, ref = weight(T.Q4_K, 7, 256)
    x = activations(3, 256)
    np.testing.assert_array_equal(quant.matmul(x, w, "exact"), reference.matmul(x, w.raw, T.Q4_K, 7, 256))


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_tiles_without_blas_handle(t):
    """Large batches when the kernels hold no sgemm: matmul dequantizes tiles and multiplies in numpy."""
    lib = needs_native()
    w, ref = weight(t, 37, ks(t)[-1])
    x = activations(40, w.k)
    lib.set_blas(None, 0, None)
    try:
        got = quant.matmul(x, w, "exact")
    finally:
        native._hook_blas(lib)
    assert_within(got, truth(x, ref), rounding(x, ref), "numpy tiles")
    np.testing.assert_allclose(quant.matmul(x, w, "exact"), got, rtol=0, atol=float(np.max(rounding(x, ref))))


# ---- threads --------------------------------------------------------------------------------


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_threads_agree(t, monkeypatch):
    needs_native()
    monkeypatch.setattr(native, "_threads", native._threads)   # the Python-side count, restored after
    prev = native.threads()
    w, ref = weight(t, 37, ks(t)[-1])
    try:
        for n in (1, 5, quant.GEMV_MAX_ROWS, 40):
            x = activations(n, w.k, seed=2)
            bound = 2 * rounding(x, ref)
            got = {}
            for threads in (1, 2):
                quant.set_threads(threads)
                assert native.threads() == threads
                got[threads] = (quant.matmul(x, w, "exact"), quant.matmul(x, w, "fast"))
            for mode in (0, 1):
                assert_within(got[2][mode], got[1][mode].astype(np.float64), bound, f"threads 1 vs 2, n={n}, mode {mode}")
            ids = np.array([36, 0, 5, 5], np.int32)
            np.testing.assert_array_equal(quant.gather_rows(w, ids), ref[ids])
    finally:
        quant.set_threads(prev)
    assert native.threads() == prev


def test_thread_count_holds_on_every_calling_thread():
    """The node computes on gRPC worker threads: --threads must bind there too, not only on the
    thread that set it (OpenMP's own setting is per thread)."""
    import threading

    if quant.native.load() is None:
        pytest.skip("no compiled kernels here")
    before = quant.native.threads()
    seen = []
    try:
        quant.set_threads(1)
        t = threading.Thread(target=lambda: seen.append(quant.native.threads()))
        t.start()
        t.join()
    finally:
        quant.set_threads(before)
    assert seen == [1]


@pytest.mark.parametrize("t", QUANTS, ids=lambda t: t.name)
@pytest.mark.parametrize("n", [1, 5, 16])
def test_matmul_many_equals_one_by_one(t, n):
    """Several weights by one x in one kernel call (q/k/v, gate/up) == each matmul alone."""
    k = ks(t)[-1]
    ws = [weight(t, m, k)[0] for m in (7, 3, 37)]
    x = activations(n, k)
    for got, w in zip(quant.matmul_many(x, ws, "exact"), ws):
        np.testing.assert_array_equal(got, quant.matmul(x, w, "exact"))
