"""Quantized matmul and row gather on a CUDA device (cupy): the array-API code of ``xp_dequant``
run with the cupy namespace. A tile of weight rows is dequantized on the GPU into a float32
scratch and multiplied with cuBLAS (``cupy.matmul``); the weights stay in their GGUF blocks.

Unverified on hardware: the tests run it only where cupy and a GPU are present, and ``xp_dequant``
itself is checked bit-exact against gguf-py under numpy and array-api-strict. cupy is imported
lazily, so this module imports fine without it.
"""
from __future__ import annotations

import functools
from typing import Any

import array_api_compat

from . import xp_dequant

Array = Any


@functools.cache
def namespace() -> Any:
    """The array-API namespace of cupy (raises ImportError when cupy is not installed)."""
    import cupy  # type: ignore[import-not-found]

    return array_api_compat.array_namespace(cupy.empty(0))


def matmul(x: Array, raw: Array, qtype: Any, shape: tuple[int, int], tile_rows: int = 4096) -> Array:
    """x [N, K] @ W.T -> float32 cupy [N, M] for W [M, K] stored as GGUF blocks in uint8 `raw`
    [M, row_bytes]; host arrays are copied to the current device."""
    xp = namespace()
    return xp_dequant.matmul(xp, xp.asarray(x), xp.asarray(raw), qtype, shape, tile_rows)


def gather_rows(raw: Array, qtype: Any, shape: tuple[int, int], ids: Array) -> Array:
    """Rows `ids` of the stored matrix, dequantized on the device: float32 cupy [len(ids), K]."""
    xp = namespace()
    return xp_dequant.gather_rows(xp, xp.asarray(raw), qtype, shape, xp.asarray(ids))
