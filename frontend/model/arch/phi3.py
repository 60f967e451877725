"""phi3: Phi-3 / Phi-3.5 / Phi-4-mini (``general.architecture = phi3``).

The llama block with neox rope, with the fused tensors llama.cpp's converter writes: ``attn_qkv``
[n_embd + 2 kv_dim, n_embd] (Q, K, V rows one after the other) and
``ffn_up`` [2 n_ff, n_embd] (gate rows, then up rows: ggml_swiglu's halves). The parts are views of
the same stored bytes (GraphBuilder.rows), nothing is copied. ``phi3.attention.sliding_window``,
when present, applies to every layer as in llama.cpp. LongRoPE models (``rope_factors_*`` tensors)
are refused rather than run with the wrong rope.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from llamarpc.client import GraphBuilder, Value

from . import llama
from .llama import ModelArgs, StepInputs, attend_and_ffn, rope_attrs  # noqa: F401 - the arch interface


def args_from_metadata(md: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]]) -> ModelArgs:
    if any(n.startswith("rope_factors") for n in tensor_shapes):
        raise ValueError("phi3 with LongRoPE factors (rope_factors_long/short) is not supported")
    if "blk.0.attn_qkv.weight" not in tensor_shapes:
        raise ValueError("phi3 without the fused attn_qkv tensor is not supported")
    a = md.get("general.architecture")
    window = int(md.get(f"{a}.attention.sliding_window", 0) or 0)
    return ModelArgs.from_metadata(md, tensor_shapes, rope_mode=llama.ROPE_NEOX, sliding_window=window,
                                   qkv_bias=False)


def layer_tensor_names(args: ModelArgs, i: int) -> list[str]:
    return [f"blk.{i}.{n}.weight" for n in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")]


def tensor_names(args: ModelArgs, layers: range, first: bool, last: bool) -> list[str]:
    return llama.tensor_names(args, layers, first, last, layer_tensor_names)


def build_layer(gb: GraphBuilder, args: ModelArgs, i: int, x: Value, w: Callable[[str], Value],
                kv: tuple[Value, Value], s: StepInputs) -> Value:
    p = f"blk.{i}"
    h = gb.mul(gb.rms_norm(x, args.rms_eps), w(f"{p}.attn_norm.weight"))
    qkv = w(f"{p}.attn_qkv.weight")
    qd = args.n_head * args.head_dim
    q = gb.matmul(h, gb.rows(qkv, 0, qd))
    k = gb.matmul(h, gb.rows(qkv, qd, args.kv_dim))
    v = gb.matmul(h, gb.rows(qkv, qd + args.kv_dim, args.kv_dim))

    def ffn(hh: Value) -> Value:
        up = w(f"{p}.ffn_up.weight")
        return gb.swiglu(gb.matmul(hh, gb.rows(up, 0, args.n_ff)), gb.matmul(hh, gb.rows(up, args.n_ff, args.n_ff)))
    return attend_and_ffn(gb, args, i, x, q, k, v, w, kv, s, ffn)


def build_graph(gb: GraphBuilder, args: ModelArgs, layers: range, first: bool, last: bool,
                w: Callable[[str], Value], kv: Mapping[int, tuple[Value, Value]]) -> None:
    llama.build_graph(gb, args, layers, first, last, w, kv, layer=build_layer)
