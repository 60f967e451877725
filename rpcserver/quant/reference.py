"""The plain numpy reference: dequantize with gguf-py, multiply with BLAS.

This is the spec the compiled kernels are tested against, and the fallback on a machine with no
C compiler. It never keeps a float32 copy of a weight: a matrix is dequantized a tile of rows at a
time into a scratch that is dropped after the multiply.
"""
from __future__ import annotations

import numpy as np
from gguf.quants import dequantize as gguf_dequantize
from llamarpc.proto.types import GGMLType

TILE_BYTES = 4 << 20   # float32 scratch per tile


def dequantize(raw: np.ndarray, qtype: GGMLType, k: int) -> np.ndarray:
    """Stored rows (uint8 blocks, or a typed array for F32/F16) -> float32 [rows, k]."""
    if raw.shape[0] == 0:
        return np.empty((0, k), np.float32)
    if qtype == GGMLType.F32:
        return np.asarray(raw, dtype=np.float32).reshape(-1, k)
    if qtype == GGMLType.F16:
        return np.asarray(raw).view(np.float16).astype(np.float32).reshape(-1, k)
    return gguf_dequantize(np.asarray(raw).view(np.uint8), qtype).reshape(-1, k).astype(np.float32, copy=False)


def tile_rows(k: int) -> int:
    return max(1, TILE_BYTES // (4 * k))


def matmul(x: np.ndarray, raw: np.ndarray, qtype: GGMLType, m: int, k: int) -> np.ndarray:
    """x[N, k] @ W.T -> float32 [N, m], W dequantized tile by tile."""
    out = np.empty((x.shape[0], m), np.float32)
    step = tile_rows(k)
    for r0 in range(0, m, step):
        r1 = min(m, r0 + step)
        out[:, r0:r1] = x @ dequantize(raw[r0:r1], qtype, k).T
    return out


def quantize_q8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Activations as 8-bit blocks of 32 (ggml's q8_0 rule): int8 q [N, K] and f32 d [N, K/32]."""
    n, k = x.shape
    b = x.reshape(n, k // 32, 32)
    d = (np.abs(b).max(axis=-1) / np.float32(127)).astype(np.float32)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d > 0)
    v = (b * inv[..., None]).astype(np.float64)   # halves away from zero, as C's roundf (exact in f64)
    q = np.trunc(v + np.copysign(0.5, v))
    return q.astype(np.int8).reshape(n, k), d


def matmul_fast(x: np.ndarray, raw: np.ndarray, qtype: GGMLType, m: int, k: int) -> np.ndarray:
    """What the fast kernels compute: the weights exactly, the activations rounded to 8 bits."""
    q, d = quantize_q8(x)
    xr = (q.reshape(x.shape[0], k // 32, 32).astype(np.float32) * d[..., None]).reshape(x.shape)
    return matmul(xr, raw, qtype, m, k)
