"""qwen2: Qwen2 / Qwen2.5 (``general.architecture = qwen2``).

The llama block with biases on Q, K and V and neox-style rope; the rest of the graph is llama's.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import llama
from .llama import build_graph, rope_attrs, tensor_names

ModelArgs = llama.ModelArgs


def args_from_metadata(md: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]]) -> llama.ModelArgs:
    return llama.ModelArgs.from_metadata(md, tensor_shapes, rope_mode=llama.ROPE_NEOX, qkv_bias=True)


__all__ = ["ModelArgs", "args_from_metadata", "build_graph", "rope_attrs", "tensor_names"]
