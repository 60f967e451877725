"""GGUF blocks -> float32, written once against an array namespace ``xp`` (Python array API).

numpy, cupy and array-api-strict all run this code: it is the portable twin of the fast quantized
matmul, and the CUDA path (``cuda.py``: dequantize a tile of weight rows, multiply with cuBLAS).
Each type's function ports ``dequantize_blocks`` of gguf-py's ``gguf/quants.py`` and is tested
bit-exact against it. The array API has no bit cast, so the f16/bf16/f32 values stored in the blocks
are rebuilt from their bytes arithmetically (sign, exponent, mantissa), exactly as IEEE defines them.

Every block function takes ``blocks``, a uint8 array [n_blocks, type_size], and returns float32
[n_blocks, block_size]; ``raw`` arrays are uint8 [rows, K // block_size * type_size].
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import array_api_compat
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

Array = Any
QK_K = 256


# ---- small helpers ---------------------------------------------------------------------------

def _const(xp: Any, like: Array, value: Any, dtype: Any) -> Array:
    """A constant (scalar or list) on the device of `like`."""
    return xp.asarray(value, dtype=dtype, device=array_api_compat.device(like))


def _i32(xp: Any, a: Array) -> Array:
    return xp.astype(a, xp.int32)


def _f32(xp: Any, a: Array) -> Array:
    return xp.astype(a, xp.float32)


def _split_bits(xp: Any, q: Array, width: int, inner: bool = False) -> Array:
    """Each byte of uint8 q [..., m] as its 8 // width fields of `width` bits, lowest first:
    [..., fields, m] (gguf's usual order), or [..., m, fields] when `inner`."""
    n = 8 // width
    shifts = _const(xp, q, [i * width for i in range(n)], xp.uint8)
    if inner:
        q = xp.expand_dims(q, axis=-1)
    else:
        q = xp.expand_dims(q, axis=-2)
        shifts = xp.reshape(shifts, (n, 1))
    return xp.bitwise_right_shift(q, shifts) & ((1 << width) - 1)


def _mul_pow2(xp: Any, v: Array, t: Array, bits: int) -> Array:
    """v * 2**t for int32 t with |t| < 2**bits (bits <= 8), exact whenever the result is a float32:
    the array API has no ldexp, so multiply in the powers 2**(+-2**i) that the bits of |t| select.
    Every intermediate lies between v and the result, with the same significand, so none rounds."""
    neg = t < 0
    a = xp.abs(t)
    one = _const(xp, v, 1.0, xp.float32)
    for i in range(bits):
        step = min(1 << i, 64)   # 2**128 is not a float32: apply it as 2**64 twice
        f = xp.where(neg, _const(xp, v, 2.0 ** -step, xp.float32), _const(xp, v, 2.0 ** step, xp.float32))
        f = xp.where((a & (1 << i)) != 0, f, one)
        for _ in range(1 if i < 7 else 2):
            v = v * f
    return v


def _ieee(xp: Any, sign: Array, exp: Array, man: Array, ebits: int, mbits: int) -> Array:
    """The float32 value of the IEEE binary float with these int32 fields: normals, subnormals,
    signed zeros, infinities and NaN."""
    top = (1 << ebits) - 1
    normal, special = _i32(xp, exp != 0), exp == top
    mant = _f32(xp, man | (normal << mbits))                   # < 2**24: exact
    e = exp + (1 - normal) - _i32(xp, special) * (top - 1)     # subnormals (and inf/NaN, replaced below): 1
    bias = (1 << (ebits - 1)) - 1
    v = _mul_pow2(xp, mant, e - (bias + mbits), bits=(bias + mbits).bit_length())
    inf_nan = xp.where(man == 0, _const(xp, v, math.inf, xp.float32), _const(xp, v, math.nan, xp.float32))
    v = xp.where(special, inf_nan, v)
    return xp.where(sign != 0, -v, v)


def _half(xp: Any, b: Array) -> Array:
    """Little-endian IEEE halves in uint8 b [..., 2k] -> float32 [..., k]."""
    h = _i32(xp, b[..., 0::2]) | (_i32(xp, b[..., 1::2]) << 8)
    return _ieee(xp, h >> 15, (h >> 10) & 0x1F, h & 0x3FF, ebits=5, mbits=10)


def _signed8(xp: Any, q: Array) -> Array:
    """uint8 bytes read as int8, widened to int32."""
    return (_i32(xp, q) ^ 0x80) - 0x80


# ---- one function per type -------------------------------------------------------------------

def _deq_f32(xp: Any, blocks: Array) -> Array:
    b0, b1, b2, b3 = (_i32(xp, blocks[:, i:i + 1]) for i in range(4))
    man = ((b2 & 0x7F) << 16) | (b1 << 8) | b0
    return _ieee(xp, b3 >> 7, ((b3 & 0x7F) << 1) | (b2 >> 7), man, ebits=8, mbits=23)


def _deq_f16(xp: Any, blocks: Array) -> Array:
    return _half(xp, blocks)


def _deq_bf16(xp: Any, blocks: Array) -> Array:
    # the top half of a float32: the low byte holds 7 mantissa bits and the exponent's lowest bit
    lo, hi = _i32(xp, blocks[:, 0:1]), _i32(xp, blocks[:, 1:2])
    return _ieee(xp, hi >> 7, ((hi & 0x7F) << 1) | (lo >> 7), (lo & 0x7F) << 16, ebits=8, mbits=23)


def _nibbles(xp: Any, qs: Array) -> Array:
    """[n, 16] bytes -> [n, 32] 4-bit values: low nibbles first, then high nibbles."""
    return xp.reshape(_split_bits(xp, qs, 4), (qs.shape[0], 32))


def _fifth_bits(xp: Any, qh: Array) -> Array:
    """[n, 4] bytes (a little-endian uint32) -> [n, 32]: bit i of it is element i."""
    return xp.reshape(_split_bits(xp, qh, 1, inner=True), (qh.shape[0], 32))


def _deq_q4_0(xp: Any, blocks: Array) -> Array:
    d = _half(xp, blocks[:, 0:2])
    q = _i32(xp, _nibbles(xp, blocks[:, 2:])) - 8
    return d * _f32(xp, q)


def _deq_q4_1(xp: Any, blocks: Array) -> Array:
    d, m = _half(xp, blocks[:, 0:2]), _half(xp, blocks[:, 2:4])
    return d * _f32(xp, _nibbles(xp, blocks[:, 4:])) + m


def _q5(xp: Any, qh: Array, qs: Array) -> Array:
    return _nibbles(xp, qs) | (_fifth_bits(xp, qh) << 4)


def _deq_q5_0(xp: Any, blocks: Array) -> Array:
    d = _half(xp, blocks[:, 0:2])
    q = _i32(xp, _q5(xp, blocks[:, 2:6], blocks[:, 6:])) - 16
    return d * _f32(xp, q)


def _deq_q5_1(xp: Any, blocks: Array) -> Array:
    d, m = _half(xp, blocks[:, 0:2]), _half(xp, blocks[:, 2:4])
    return d * _f32(xp, _q5(xp, blocks[:, 4:8], blocks[:, 8:])) + m


def _deq_q8_0(xp: Any, blocks: Array) -> Array:
    d = _half(xp, blocks[:, 0:2])
    return _f32(xp, _signed8(xp, blocks[:, 2:])) * d


def _deq_q2_k(xp: Any, blocks: Array) -> Array:
    n = blocks.shape[0]
    scales, qs = blocks[:, :16], blocks[:, 16:80]
    d, dmin = _half(xp, blocks[:, 80:82]), _half(xp, blocks[:, 82:84])
    dl = xp.reshape(d * _f32(xp, scales & 0xF), (n, 16, 1))
    ml = xp.reshape(dmin * _f32(xp, scales >> 4), (n, 16, 1))
    q = xp.reshape(_split_bits(xp, xp.reshape(qs, (n, 2, 32)), 2), (n, 16, 16))
    return xp.reshape(dl * _f32(xp, q) - ml, (n, QK_K))


def _deq_q3_k(xp: Any, blocks: Array) -> Array:
    n = blocks.shape[0]
    hmask, qs, scales = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    d = _half(xp, blocks[:, 108:110])
    # 16 6-bit scales: low 4 bits in bytes 0..7 (two nibbles each), high 2 bits in bytes 8..11
    lo = xp.reshape(_split_bits(xp, scales[:, :8], 4), (n, 16))
    hi = xp.reshape(_split_bits(xp, scales[:, 8:], 2), (n, 16))
    sc = _i32(xp, lo | (hi << 4)) - 32
    dl = xp.reshape(d * _f32(xp, sc), (n, 16, 1))
    ql = xp.reshape(_split_bits(xp, xp.reshape(qs, (n, 2, 32)), 2), (n, 16, 16))
    qh = xp.reshape(_split_bits(xp, hmask, 1), (n, 16, 16))
    q = _i32(xp, ql) - (_i32(xp, qh ^ 1) << 2)   # a set mask bit means no -4
    return xp.reshape(dl * _f32(xp, q), (n, QK_K))


def _scale_min_k4(xp: Any, scales: Array) -> tuple[Array, Array]:
    """The 8 6-bit scales and 8 6-bit mins packed in 12 bytes (Q4_K, Q5_K) -> two [n, 8]."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = xp.concat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = xp.concat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _k4_scales(xp: Any, blocks: Array) -> tuple[Array, Array]:
    """Q4_K/Q5_K: per 32-value sub-block scale and min, each [n, 8, 1]."""
    n = blocks.shape[0]
    d, dmin = _half(xp, blocks[:, 0:2]), _half(xp, blocks[:, 2:4])
    sc, mn = _scale_min_k4(xp, blocks[:, 4:16])
    return xp.reshape(d * _f32(xp, sc), (n, 8, 1)), xp.reshape(dmin * _f32(xp, mn), (n, 8, 1))


def _deq_q4_k(xp: Any, blocks: Array) -> Array:
    n = blocks.shape[0]
    d, dm = _k4_scales(xp, blocks)
    q = xp.reshape(_split_bits(xp, xp.reshape(blocks[:, 16:], (n, 4, 32)), 4), (n, 8, 32))
    return xp.reshape(d * _f32(xp, q) - dm, (n, QK_K))


def _deq_q5_k(xp: Any, blocks: Array) -> Array:
    n = blocks.shape[0]
    d, dm = _k4_scales(xp, blocks)
    qh, qs = blocks[:, 16:48], blocks[:, 48:]
    ql = xp.reshape(_split_bits(xp, xp.reshape(qs, (n, 4, 32)), 4), (n, 8, 32))
    qh = xp.reshape(_split_bits(xp, qh, 1), (n, 8, 32))
    q = ql | (qh << 4)
    return xp.reshape(d * _f32(xp, q) - dm, (n, QK_K))


def _deq_q6_k(xp: Any, blocks: Array) -> Array:
    n = blocks.shape[0]
    ql, qh, scales = blocks[:, :128], blocks[:, 128:192], blocks[:, 192:208]
    d = xp.reshape(_half(xp, blocks[:, 208:210]) * _f32(xp, _signed8(xp, scales)), (n, 16, 1))
    lo = xp.reshape(_split_bits(xp, xp.reshape(ql, (n, 2, 64)), 4), (n, 8, 32))
    hi = xp.reshape(_split_bits(xp, xp.reshape(qh, (n, 2, 32)), 2), (n, 8, 32))
    q = _i32(xp, lo | (hi << 4)) - 32
    return xp.reshape(d * _f32(xp, xp.reshape(q, (n, 16, 16))), (n, QK_K))


_DEQUANT: dict[T, Callable[[Any, Array], Array]] = {
    T.F32: _deq_f32, T.F16: _deq_f16, T.BF16: _deq_bf16,
    T.Q4_0: _deq_q4_0, T.Q4_1: _deq_q4_1, T.Q5_0: _deq_q5_0, T.Q5_1: _deq_q5_1, T.Q8_0: _deq_q8_0,
    T.Q2_K: _deq_q2_k, T.Q3_K: _deq_q3_k, T.Q4_K: _deq_q4_k, T.Q5_K: _deq_q5_k, T.Q6_K: _deq_q6_k,
}
SUPPORTED = tuple(_DEQUANT)


# ---- the public functions --------------------------------------------------------------------

def _kernel(qtype: Any) -> tuple[Callable[[Any, Array], Array], int, int]:
    try:
        t = T(qtype)
    except ValueError:
        raise ValueError(f"unknown GGML type {qtype!r}") from None
    fn = _DEQUANT.get(t)
    if fn is None:
        raise ValueError(f"no array-API dequantizer for GGML type {t.name}")
    block, size = GGML_QUANT_SIZES[t]
    return fn, block, size


def _check_raw(xp: Any, raw: Array, qtype: Any, shape: tuple[int, int]) -> tuple[Callable, int, int]:
    fn, block, size = _kernel(qtype)
    name = T(qtype).name
    if len(shape) != 2:
        raise ValueError(f"{name}: shape must be 2-d [rows, K], got {tuple(shape)}")
    rows, k = shape
    if k % block:
        raise ValueError(f"{name}: K={k} is not a multiple of the block size {block}")
    if raw.dtype != xp.uint8 or tuple(raw.shape) != (rows, k // block * size):
        raise ValueError(f"{name} {tuple(shape)}: raw must be uint8 [{rows}, {k // block * size}], "
                         f"got {raw.dtype} {tuple(raw.shape)}")
    return fn, block, size


def dequantize(xp: Any, raw: Array, qtype: Any, shape: tuple[int, int]) -> Array:
    """uint8 GGUF blocks [rows, row_bytes] -> float32 [rows, K]."""
    fn, block, size = _check_raw(xp, raw, qtype, shape)
    rows, k = shape
    blocks = xp.reshape(raw, (rows * (k // block), size))
    return xp.reshape(fn(xp, blocks), (rows, k))


def gather_rows(xp: Any, raw: Array, qtype: Any, shape: tuple[int, int], ids: Any) -> Array:
    """Rows `ids` of the quantized matrix, dequantized: float32 [len(ids), K]."""
    _check_raw(xp, raw, qtype, shape)
    ids = xp.asarray(ids, device=array_api_compat.device(raw))
    if ids.ndim != 1 or not xp.isdtype(ids.dtype, "integral"):
        raise ValueError(f"gather_rows: ids must be a 1-d integer array, got {ids.dtype} {tuple(ids.shape)}")
    n = ids.shape[0]
    if n and not (int(xp.min(ids)) >= 0 and int(xp.max(ids)) < shape[0]):   # cupy's take would wrap
        raise IndexError(f"gather_rows: ids must be in [0, {shape[0]})")
    return dequantize(xp, xp.take(raw, ids, axis=0), qtype, (n, shape[1]))


def matmul(xp: Any, x: Array, raw: Array, qtype: Any, shape: tuple[int, int], tile_rows: int = 4096) -> Array:
    """x [N, K] @ W.T -> float32 [N, M] for the quantized W [M, K], dequantizing at most `tile_rows`
    rows of W at a time into a float32 scratch that ``xp.matmul`` (BLAS, cuBLAS) multiplies."""
    _check_raw(xp, raw, qtype, shape)
    m, k = shape
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"matmul: x must be [N, {k}], got {tuple(x.shape)}")
    if tile_rows < 1:
        raise ValueError(f"matmul: tile_rows must be >= 1, got {tile_rows}")
    x = xp.astype(x, xp.float32, copy=False)
    out = xp.empty((x.shape[0], m), dtype=xp.float32, device=array_api_compat.device(x))
    for a in range(0, m, tile_rows):
        b = min(a + tile_rows, m)
        w = dequantize(xp, raw[a:b, :], qtype, (b - a, k))
        out[:, a:b] = xp.matmul(x, xp.matrix_transpose(w))
    return out
