"""A GGUF file, memory-mapped through the ``gguf`` package: metadata as plain values, tensors as
raw byte views (nothing is copied or dequantized here)."""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

log = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """The model file cannot be used; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    type: GGMLQuantizationType
    shape: tuple[int, ...]     # row-major (numpy) order: GGUF's ne reversed
    data: np.ndarray           # uint8 view of the tensor's bytes in the mapped file

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


class GGUFFile:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise ModelLoadError(f"{self.path}: no such model file")
        size = os.path.getsize(self.path)
        try:
            reader = GGUFReader(self.path, "r")
        except ValueError as e:
            msg = str(e)
            if "is not a valid GGMLQuantizationType" in msg:
                raise ModelLoadError(f"{self.path}: unknown tensor type ({msg})") from None
            raise ModelLoadError(f"{self.path}: not a readable GGUF file ({msg})") from None
        except (IndexError, OSError, struct_error()) as e:
            raise ModelLoadError(f"{self.path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from None
        self.reader = reader
        self.metadata: dict[str, Any] = {}
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                self.metadata[key] = field.contents()
            except Exception as e:  # noqa: BLE001 - a malformed field is a load error, named
                raise ModelLoadError(f"{self.path}: metadata key {key!r} is malformed ({e})") from None
        self.tensors: dict[str, TensorInfo] = {}
        raw = reader.data
        for t in reader.tensors:
            qtype = GGMLQuantizationType(t.tensor_type)
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            block, type_size = GGML_QUANT_SIZES[qtype]
            n = int(np.prod(shape, dtype=np.int64))
            nbytes = n // block * type_size
            start = int(t.data_offset)
            if start + nbytes > size:
                raise ModelLoadError(
                    f"{self.path}: truncated file: tensor {t.name!r} needs bytes up to {start + nbytes}, "
                    f"the file has {size}")
            self.tensors[t.name] = TensorInfo(t.name, qtype, shape, raw[start:start + nbytes])
        log.debug("%s: %d tensors, %d metadata keys", self.path, len(self.tensors), len(self.metadata))

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelLoadError(f"{self.path}: general.architecture is missing")
        return arch

    def tensor(self, name: str) -> TensorInfo:
        t = self.tensors.get(name)
        if t is None:
            raise ModelLoadError(f"{self.path}: missing tensor {name!r}")
        return t


def struct_error() -> type[Exception]:
    import struct

    return struct.error
