"""Tensor types: GGML's ids (gguf.GGMLQuantizationType) with their block sizes, checked sizes."""
from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import InvalidArgument

GGMLType = GGMLQuantizationType

# Types a node accepts for tensors in its buffers. Everything gguf.quants can dequantize in numpy
# that llama.cpp models use; more can be added once a kernel path exists.
SUPPORTED_TYPES: frozenset[GGMLType] = frozenset({
    GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.I32,
    GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0,
    GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K,
})

ACTIVATION_DTYPES: dict[GGMLType, np.dtype] = {
    GGMLType.F32: np.dtype(np.float32),
    GGMLType.I32: np.dtype(np.int32),
}

PLAIN_DTYPES: dict[GGMLType, np.dtype] = {
    GGMLType.F32: np.dtype(np.float32),
    GGMLType.F16: np.dtype(np.float16),
    GGMLType.I32: np.dtype(np.int32),
}

MAX_ELEMENTS = 1 << 40


def parse_type(type_id: int, what: str = "tensor") -> GGMLType:
    try:
        t = GGMLType(type_id)
    except ValueError:
        raise InvalidArgument(f"{what}: unknown tensor type id {type_id}") from None
    if t not in SUPPORTED_TYPES:
        raise InvalidArgument(f"{what}: tensor type {t.name} is not supported")
    return t


def tensor_nbytes(t: GGMLType, shape: tuple[int, ...] | list[int], what: str = "tensor") -> int:
    """Bytes of a row-major tensor of `shape`; rejects bad dims and partial quant blocks."""
    if not 1 <= len(shape) <= 4:
        raise InvalidArgument(f"{what}: a tensor has 1 to 4 dimensions, got {len(shape)}")
    n = 1
    for d in shape:
        if d <= 0:
            raise InvalidArgument(f"{what}: dimensions must be positive, got {list(shape)}")
        n *= d
        if n > MAX_ELEMENTS:
            raise InvalidArgument(f"{what}: shape {list(shape)} is too large")
    block, type_size = GGML_QUANT_SIZES[t]
    if shape[-1] % block:
        raise InvalidArgument(
            f"{what}: innermost dimension {shape[-1]} is not a multiple of the {t.name} block size {block}")
    return n // block * type_size
