"""The array-API dequantizer (rpcserver/quant/xp_dequant.py, the CUDA path's code) against gguf-py:
bit-exact for every type, under numpy and again under array-api-strict (so cupy can run it); the
row gather and the tiled matmul against numpy references; the cupy wrapper where a GPU is present."""
from __future__ import annotations

import array_api_strict
import numpy as np
import pytest
from array_api_compat import array_namespace
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from llamarpc.rpcserver.quant import cuda, xp_dequant
from synth import KQUANTS, QUANTIZABLE, make_weight

NAMESPACES = ["numpy", "strict"]
TYPES = QUANTIZABLE + KQUANTS
RNG = np.random.default_rng(0)


def ns(name):
    return array_namespace(np.empty(0)) if name == "numpy" else array_api_strict


def host(a):
    try:
        return np.asarray(a)
    except Exception:  # array-api-strict refuses implicit conversion in some versions
        return np.from_dlpack(a)


def k_of(t: T, several: bool) -> int:
    """K for one block per row (K = 1 for F32/F16/BF16), or several: 2 k-quant super-blocks, else 160."""
    block = GGML_QUANT_SIZES[t][0]
    if not several:
        return block
    return 2 * block if block == 256 else 160   # 5 blocks of 32 values; 160 1-value "blocks"


def stored(t: T, rows: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Random GGUF bytes uint8 [rows, row_bytes] of type t, and gguf-py's float32 [rows, k] of them."""
    w = make_weight(RNG, (rows, k), t)
    raw = np.ascontiguousarray(w).view(np.uint8)
    return raw, gguf_dequantize(raw, t).reshape(rows, k).astype(np.float32)


def assert_bits_equal(got: np.ndarray, ref: np.ndarray) -> None:
    """Equal as float32 bit patterns (so -0.0 != 0.0), NaN only where the reference has NaN."""
    assert got.dtype == np.float32 and got.shape == ref.shape
    nan = np.isnan(ref)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), ref[~nan].view(np.uint32))


def assert_dot_close(got: np.ndarray, x: np.ndarray, w: np.ndarray) -> None:
    """got == x @ w.T up to float32 rounding of the sums (bounded by |x| @ |w|.T)."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    ref = x64 @ w64.T
    bound = 1e-5 * (np.abs(x64) @ np.abs(w64).T) + 1e-30
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.all(np.abs(got - ref) <= bound), float(np.max(np.abs(got - ref) / bound))


@pytest.mark.parametrize("name", NAMESPACES)
@pytest.mark.parametrize("several", [False, True], ids=["one_block", "several_blocks"])
@pytest.mark.parametrize("rows", [3, 17])
@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_dequantize_bit_exact(t, rows, several, name):
    xp = ns(name)
    raw, ref = stored(t, rows, k_of(t, several))
    assert_bits_equal(host(xp_dequant.dequantize(xp, xp.asarray(raw), t, ref.shape)), ref)


@pytest.mark.parametrize("name", NAMESPACES)
@pytest.mark.parametrize("t", [T.F16, T.BF16], ids=lambda t: t.name)
def test_every_16_bit_pattern(t, name):
    """All 65536 halves / bfloat16s: normals, subnormals, both zeros, infinities, NaNs."""
    xp = ns(name)
    raw = np.arange(1 << 16, dtype=np.uint16).view(np.uint8).reshape(256, 512)
    ref = gguf_dequantize(raw, t).reshape(256, 256).astype(np.float32)
    assert_bits_equal(host(xp_dequant.dequantize(xp, xp.asarray(raw), t, (256, 256))), ref)


@pytest.mark.parametrize("name", NAMESPACES)
def test_f32_bit_patterns(name):
    xp = ns(name)
    special = [0, 0x80000000, 1, 0x807FFFFF, 0x00800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x3F800000,
               0x7F800000, 0xFF800000, 0x7FC00000, 0xFFFFFFFF, 0x00400001]
    bits = np.concatenate([np.array(special, dtype=np.uint32),
                           RNG.integers(0, 1 << 32, size=4096 - len(special), dtype=np.uint32)])
    raw = bits.view(np.uint8).reshape(16, 1024)
    ref = bits.view(np.float32).reshape(16, 256)
    assert_bits_equal(host(xp_dequant.dequantize(xp, xp.asarray(raw), T.F32, (16, 256))), ref)


@pytest.mark.parametrize("name", NAMESPACES)
@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_gather_rows(t, name):
    xp = ns(name)
    raw, ref = stored(t, 17, k_of(t, True))
    ids = np.array([16, 0, 3, 3, 7], dtype=np.int64)
    got = xp_dequant.gather_rows(xp, xp.asarray(raw), t, ref.shape, xp.asarray(ids))
    assert_bits_equal(host(got), ref[ids])
    empty = xp_dequant.gather_rows(xp, xp.asarray(raw), t, ref.shape, xp.asarray(np.zeros(0, dtype=np.int64)))
    assert tuple(empty.shape) == (0, ref.shape[1])


@pytest.mark.parametrize("name", NAMESPACES)
@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_matmul_tiled(t, name):
    xp = ns(name)
    raw, w = stored(t, 17, k_of(t, True))
    x = RNG.standard_normal((5, w.shape[1])).astype(np.float32)
    for tile_rows in (4, 17, 4096):   # 4 + 4 + 4 + 4 + 1 rows; one tile; the default
        got = xp_dequant.matmul(xp, xp.asarray(x), xp.asarray(raw), t, w.shape, tile_rows=tile_rows)
        assert_dot_close(host(got), x, w)


def test_errors():
    xp = ns("numpy")
    raw = np.zeros((2, 34), dtype=np.uint8)
    with pytest.raises(ValueError, match="IQ2_XXS"):
        xp_dequant.dequantize(xp, raw, T.IQ2_XXS, (2, 256))
    with pytest.raises(ValueError, match="9999"):
        xp_dequant.dequantize(xp, raw, 9999, (2, 32))
    with pytest.raises(ValueError, match="raw must be uint8"):
        xp_dequant.dequantize(xp, raw, T.Q8_0, (2, 64))
    with pytest.raises(ValueError, match="multiple of the block size"):
        xp_dequant.dequantize(xp, raw, T.Q8_0, (2, 33))
    with pytest.raises(IndexError):
        xp_dequant.gather_rows(xp, raw, T.Q8_0, (2, 32), np.array([0, 2]))
    with pytest.raises(ValueError, match="x must be"):
        xp_dequant.matmul(xp, np.zeros((1, 16), dtype=np.float32), raw, T.Q8_0, (2, 32))


def _gpu_reason() -> str | None:
    try:
        import cupy  # type: ignore[import-not-found]
    except ImportError:
        return "cupy is not installed"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device"
    except Exception as e:  # no driver, no runtime
        return f"no usable CUDA device ({e})"
    return None


@pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))
@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_cuda_matches_reference(t):
    import cupy  # type: ignore[import-not-found]

    raw, w = stored(t, 17, k_of(t, True))
    x = RNG.standard_normal((5, w.shape[1])).astype(np.float32)
    assert_dot_close(cupy.asnumpy(cuda.matmul(cupy.asarray(x), cupy.asarray(raw), t, w.shape, tile_rows=4)), x, w)
    ids = np.array([16, 0, 3, 3, 7])
    assert_bits_equal(cupy.asnumpy(cuda.gather_rows(cupy.asarray(raw), t, w.shape, cupy.asarray(ids))), w[ids])
