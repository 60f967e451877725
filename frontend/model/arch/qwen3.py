"""qwen3: Qwen3 dense models (``general.architecture = qwen3``).

The llama block with neox rope, no QKV bias, and Q and K RMS-normalized per head before the rope
(``attn_q_norm`` / ``attn_k_norm`` [head_dim]); head_dim comes from ``qwen3.attention.key_length``
(128 in every Qwen3, whatever n_embd / n_head is).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import llama
from .llama import build_graph, rope_attrs, tensor_names

ModelArgs = llama.ModelArgs


def args_from_metadata(md: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]]) -> llama.ModelArgs:
    return llama.ModelArgs.from_metadata(md, tensor_shapes, rope_mode=llama.ROPE_NEOX, qk_norm=True)


__all__ = ["ModelArgs", "args_from_metadata", "build_graph", "rope_attrs", "tensor_names"]
