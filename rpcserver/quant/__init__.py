"""Matmul against weights kept in their GGUF blocks: one entry per GGML type.

A node never holds a float32 copy of a weight. `matmul(x, w, mode)` reads the stored blocks:
- up to GEMV_MAX_ROWS activation rows (decode, small batches): one pass over the weight's bytes
  with the compiled kernels (`kernels.c`), every row of x served from the same dequantized row;
  mode "exact" keeps the activations in float32 (today's fidelity), mode "fast" rounds them to
  8 bits per 32 values first (ggml's q8 blocks) and dots integers;
- more rows (prefill): a tile of weight rows is dequantized into a small float32 scratch that
  stays in cache and handed to BLAS sgemm, tile after tile.
Mode "reference" runs `reference.py` (gguf-py dequantize + BLAS), the oracle of the tests; it is
also what runs when no C compiler is available. F32 weights always go straight to BLAS; F16 and
BF16 have no 8-bit mode ("fast" runs them exactly).
"""
from __future__ import annotations

import ctypes
import dataclasses
import threading

import numpy as np
from gguf import GGML_QUANT_SIZES
from llamarpc.proto.types import GGMLType

from . import native, reference

MODES = ("exact", "fast", "reference")
GEMV_MAX_ROWS = 16
TILE_BYTES = 4 << 20   # float32 scratch per BLAS tile (OpenBLAS blocks it further)


@dataclasses.dataclass(frozen=True)
class QuantType:
    qtype: GGMLType
    block: int           # values per block
    block_bytes: int
    kernel: str          # function-name prefix in kernels.c; "" for F32 (BLAS directly)
    has_fast: bool       # an 8-bit-activation kernel exists


def _q(t: GGMLType, kernel: str, fast: bool) -> QuantType:
    block, size = GGML_QUANT_SIZES[t]
    return QuantType(t, block, size, kernel, fast)


TYPES: dict[GGMLType, QuantType] = {
    GGMLType.F32: _q(GGMLType.F32, "", False),
    GGMLType.F16: _q(GGMLType.F16, "f16", False),
    GGMLType.BF16: _q(GGMLType.BF16, "bf16", False),
    **{t: _q(t, t.name.lower(), True) for t in (
        GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0,
        GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K)},
}


@dataclasses.dataclass(frozen=True)
class QWeight:
    """A stored weight matrix [m, k]: its bytes as rows (uint8 blocks, or typed F32/F16)."""
    raw: np.ndarray
    qtype: GGMLType
    m: int
    k: int
    blocks: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)   # uint8 [m, row_bytes]
    address: int = dataclasses.field(init=False, repr=False, compare=False)         # of the first byte

    def __post_init__(self) -> None:
        blocks = self.raw.reshape(self.m, -1).view(np.uint8)
        object.__setattr__(self, "blocks", blocks)
        object.__setattr__(self, "address", blocks.ctypes.data)


set_threads = native.set_threads

_scratch = threading.local()


def _buf(name: str, n: int, dtype: type) -> np.ndarray:
    """A per-thread scratch of at least n elements, reused across calls."""
    a = getattr(_scratch, name, None)
    if a is None or a.size < n or a.dtype != dtype:
        a = np.empty(max(n, 1), dtype)
        setattr(_scratch, name, a)
    return a[:n]


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def dequantize_rows(w: QWeight, r0: int, r1: int, out: np.ndarray | None = None) -> np.ndarray:
    """Rows [r0, r1) of w as float32."""
    qt = TYPES[w.qtype]
    lib = native.load()
    if out is None:
        out = np.empty((r1 - r0, w.k), np.float32)
    if not qt.kernel or lib is None:
        out[...] = reference.dequantize(w.raw[r0:r1], w.qtype, w.k)
        return out
    b = w.blocks
    getattr(lib, f"{qt.kernel}_dequant_rows")(w.address, b.shape[1], w.k, r0, r1, _ptr(out))
    return out


def gather_rows(w: QWeight, ids: np.ndarray) -> np.ndarray:
    """Rows `ids` (validated by the caller) of w as float32 [len(ids), k]."""
    qt = TYPES[w.qtype]
    lib = native.load()
    ids = np.ascontiguousarray(ids, dtype=np.int32)
    if not qt.kernel or lib is None:
        return reference.dequantize(w.raw[ids], w.qtype, w.k)
    out = np.empty((ids.shape[0], w.k), np.float32)
    b = w.blocks
    getattr(lib, f"{qt.kernel}_gather_rows")(w.address, b.shape[1], w.k, _ptr(ids), ids.shape[0], _ptr(out))
    return out


def matmul_many(x: np.ndarray, ws: list[QWeight], mode: str = "exact") -> list[np.ndarray]:
    """[x @ w.T for w in ws]: weights of one quantized type and K by a small batch run in one
    kernel call (one parallel region: q/k/v or gate/up of a decode step)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    lib = native.load() if mode == "exact" else None
    qt = TYPES[ws[0].qtype]
    if (lib is None or len(ws) < 2 or not qt.has_fast or x.shape[0] > GEMV_MAX_ROWS or x.shape[0] == 0
            or any(w.qtype != ws[0].qtype or w.k != ws[0].k for w in ws)):
        return [matmul(x, w, mode) for w in ws]
    n, k = x.shape[0], ws[0].k
    blocks = [w.blocks for w in ws]
    outs = [np.empty((n, w.m), np.float32) for w in ws]
    raws = (ctypes.c_void_p * len(ws))(*(w.address for w in ws))
    ms = (ctypes.c_int64 * len(ws))(*(w.m for w in ws))
    ptrs = (ctypes.c_void_p * len(ws))(*(_ptr(o) for o in outs))
    getattr(lib, f"{qt.kernel}_gemv_exact_multi")(len(ws), raws, ms, blocks[0].shape[1], k, _ptr(x), n, ptrs)
    return outs


def tile_rows(m: int, k: int) -> int:
    """Weight rows per BLAS tile of a large batch. From the shapes alone, never the thread count
    (BLAS's sums may depend on a tile's size, and a node must compute the same bits whatever its
    --threads); >= 4 tiles a matrix, and the tiles balanced: a short last tile (12 rows of SmolLM2's
    head) sent OpenBLAS down its small-product kernel, whose sums differ from a full tile's, so a
    row's bits depended on how many rows its call had."""
    rows = max(16, min(TILE_BYTES // (4 * k), -(-m // 4) + 15 & ~15))
    n_tiles = -(-m // rows)
    return max(16, -(-m // n_tiles) + 15 & ~15)


def matmul(x: np.ndarray, w: QWeight, mode: str = "exact") -> np.ndarray:
    """x[N, k] @ w.T -> float32 [N, m]."""
    qt = TYPES[w.qtype]
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[0]
    if w.qtype == GGMLType.F32:
        return x @ w.raw.reshape(w.m, w.k).T
    lib = native.load() if mode != "reference" else None
    if lib is None:
        if mode == "fast" and qt.has_fast and n <= GEMV_MAX_ROWS:   # as the kernels: batches run exactly
            return reference.matmul_fast(x, w.raw, w.qtype, w.m, w.k)
        return reference.matmul(x, w.raw, w.qtype, w.m, w.k)
    out = np.empty((n, w.m), np.float32)
    if n == 0:
        return out
    b = w.blocks
    if n > GEMV_MAX_ROWS:
        rows = tile_rows(w.m, w.k)
        if getattr(lib, f"{qt.kernel}_gemm")(w.address, b.shape[1], w.k, w.m, _ptr(x), n, _ptr(out), rows) == 0:
            return out
        tile = _buf("tile", min(rows, w.m) * w.k, np.float32)   # no BLAS handle: tiles from here
        for r0 in range(0, w.m, rows):
            r1 = min(w.m, r0 + rows)
            t = tile[:(r1 - r0) * w.k].reshape(r1 - r0, w.k)
            getattr(lib, f"{qt.kernel}_dequant_rows")(w.address, b.shape[1], w.k, r0, r1, _ptr(t))
            out[:, r0:r1] = x @ t.T   # (numpy's matmul into a strided out= skips BLAS)
        return out
    if mode == "fast" and qt.has_fast:
        xq = _buf("xq", n * w.k, np.int8)
        xd = _buf("xd", n * (w.k // 32), np.float32)
        xs = _buf("xs", n * (w.k // 16), np.float32)
        lib.quantize_q8(_ptr(x), n, w.k, _ptr(xq), _ptr(xd), _ptr(xs))
        getattr(lib, f"{qt.kernel}_gemv_fast")(w.address, b.shape[1], w.k, w.m, _ptr(xq), _ptr(xd), _ptr(xs), n, _ptr(out))
    else:
        getattr(lib, f"{qt.kernel}_gemv_exact")(w.address, b.shape[1], w.k, w.m, _ptr(x), n, _ptr(out))
    return out

