"""The array namespace of a device, chosen once: numpy for ``cpu``, cupy for ``cuda:N``.

Kernels are written against the namespace they are given (the Python array API), so the same code
runs on numpy, cupy and array-api-strict. cupy is imported only when a CUDA device is asked for.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from types import ModuleType
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Device:
    name: str            # "cpu" or "cuda:N"
    xp: Any              # array namespace the kernels use
    lib: ModuleType      # numpy or cupy, for memory (views, byte buffers)

    @property
    def is_cpu(self) -> bool:
        return self.name == "cpu"

    def to_device(self, a: np.ndarray) -> Any:
        return a if self.is_cpu else self.lib.asarray(a)

    def to_host(self, a: Any) -> np.ndarray:
        return np.asarray(a) if self.is_cpu else self.lib.asnumpy(a)


def open_device(spec: str = "cpu") -> Device:
    """Parse ``cpu`` / ``cuda:N`` and return its Device; a bad spec is a ValueError naming it."""
    import array_api_compat

    if spec == "cpu":
        return Device("cpu", array_api_compat.array_namespace(np.empty(0)), np)
    m = re.fullmatch(r"cuda:(\d+)", spec)
    if not m:
        raise ValueError(f"unknown device {spec!r}: expected 'cpu' or 'cuda:N'")
    try:
        import cupy  # type: ignore[import-not-found]
    except ImportError as e:
        raise ValueError(f"device {spec!r} needs cupy, which is not installed ({e})") from None
    idx = int(m.group(1))
    n = cupy.cuda.runtime.getDeviceCount()
    if idx >= n:
        raise ValueError(f"device {spec!r}: only {n} CUDA device(s) present")
    cupy.cuda.Device(idx).use()
    log.info("using CUDA device %d (not yet verified on hardware by this project)", idx)
    return Device(spec, array_api_compat.array_namespace(cupy.empty(0)), cupy)
