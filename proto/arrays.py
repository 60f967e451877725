"""numpy <-> ``Array`` messages, in one place, with every field checked before use."""
from __future__ import annotations

import numpy as np

from . import llamarpc_pb2 as pb
from .errors import InvalidArgument
from .types import ACTIVATION_DTYPES, GGMLType

MAX_DIMS = 4


def array_to_pb(a: np.ndarray) -> pb.Array:
    a = np.ascontiguousarray(a)
    if a.dtype == np.float32:
        t = GGMLType.F32
    elif a.dtype == np.int32:
        t = GGMLType.I32
    else:
        raise InvalidArgument(f"arrays on the wire are float32 or int32, not {a.dtype}")
    return pb.Array(type=int(t), shape=list(a.shape), data=a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())


def array_from_pb(msg: pb.Array, what: str = "array") -> np.ndarray:
    try:
        t = GGMLType(msg.type)
    except ValueError:
        raise InvalidArgument(f"{what}: unknown type id {msg.type}") from None
    dtype = ACTIVATION_DTYPES.get(t)
    if dtype is None:
        raise InvalidArgument(f"{what}: type {t.name} is not an activation type (F32 or I32)")
    shape = tuple(msg.shape)
    if len(shape) > MAX_DIMS or any(d < 0 for d in shape):
        raise InvalidArgument(f"{what}: bad shape {list(shape)}")
    n = span = 1
    for d in shape:
        n *= d
        span *= max(d, 1)
    if span * dtype.itemsize >= 1 << 62:   # numpy refuses even an empty array whose other dims overflow
        raise InvalidArgument(f"{what}: shape {list(shape)} is too large")
    if n * dtype.itemsize != len(msg.data):
        raise InvalidArgument(
            f"{what}: shape {list(shape)} of {t.name} needs {n * dtype.itemsize} bytes, got {len(msg.data)}")
    return np.frombuffer(msg.data, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(shape)
