"""nomic-bert: Nomic Embed text encoders (``general.architecture = nomic-bert``), as llama.cpp's
build_bert builds them for LLM_ARCH_NOMIC_BERT.

bert's encoder (embeddings + LayerNorm, post-norm layers, non-causal attention, pooling) with:
no position embedding but a neox rope of Q and K (``nomic-bert.rope.freq_base``, all of each
head's dimensions), the fused ``attn_qkv`` [3 n_embd, n_embd] (views of its rows, nothing is
copied), no projection biases, and a SwiGLU FFN (``ffn_gate``, ``ffn_up``, ``ffn_down``). The
LayerNorms keep their biases. Mixture-of-experts variants (nomic-bert-moe) are another architecture.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from llamarpc.client import GraphBuilder, Value

from . import bert
from .bert import ENCODER_ONLY, BertArgs
from .llama import ROPE_NEOX, StepInputs, meta

LAYER_TENSORS = ("attn_qkv.weight", "attn_output.weight", "attn_output_norm.weight", "attn_output_norm.bias",
                 "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight", "layer_output_norm.weight",
                 "layer_output_norm.bias")


def args_from_metadata(md: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]]) -> BertArgs:
    a = meta(md, "general.architecture", required=True)
    for name in ("token_embd.weight", "token_embd_norm.weight", "token_embd_norm.bias", "blk.0.attn_qkv.weight"):
        if name not in tensor_shapes:
            raise ValueError(f"missing tensor {name!r}")
    biased = [n for n in tensor_shapes if n.startswith("blk.") and n.endswith(".bias") and "norm" not in n]
    if biased:
        raise ValueError(f"nomic-bert with projection biases ({biased[0]}, ...) is not supported")
    if any(".ffn_gate_inp." in n for n in tensor_shapes):
        raise ValueError("nomic-bert with mixture-of-experts layers is not supported")
    n_head = int(meta(md, f"{a}.attention.head_count", required=True))
    if int(meta(md, f"{a}.attention.head_count_kv", n_head)) != n_head:
        raise ValueError("nomic-bert with head_count_kv != head_count is not supported")
    if meta(md, f"{a}.attention.causal", False):
        raise ValueError("nomic-bert with causal attention is not supported")
    n_embd = int(meta(md, f"{a}.embedding_length", required=True))
    n_rot = int(meta(md, f"{a}.rope.dimension_count", n_embd // n_head))
    if n_rot != n_embd // n_head:
        raise ValueError(f"nomic-bert with rope over {n_rot} of {n_embd // n_head} head dimensions is not supported")
    return BertArgs(
        arch=a,
        n_layer=int(meta(md, f"{a}.block_count", required=True)),
        n_embd=n_embd,
        n_ff=int(meta(md, f"{a}.feed_forward_length", required=True)),
        n_head=n_head,
        n_vocab=int(tensor_shapes["token_embd.weight"][0]),
        n_ctx_train=int(meta(md, f"{a}.context_length", 2048)),
        norm_eps=float(meta(md, f"{a}.attention.layer_norm_epsilon", 1e-12)),
        pooling=int(meta(md, f"{a}.pooling_type", 0)),
        token_types="token_types.weight" in tensor_shapes,
        rope_base=float(meta(md, f"{a}.rope.freq_base", 1000.0)),
    )


def layer_tensor_names(args: BertArgs, i: int) -> list[str]:
    return [f"blk.{i}.{n}" for n in LAYER_TENSORS]


def tensor_names(args: BertArgs, layers: range, first: bool, last: bool) -> list[str]:
    return bert.tensor_names(args, layers, first, last, layer_tensor_names)


def build_layer(gb: GraphBuilder, args: BertArgs, i: int, x: Value, w: Callable[[str], Value],
                kv: tuple[Value, Value], s: StepInputs) -> Value:
    p = f"blk.{i}"
    d, hd = args.n_embd, args.head_dim
    qkv = w(f"{p}.attn_qkv.weight")
    rope = dict(head_dim=hd, n_dims=hd, mode=ROPE_NEOX, freq_base=args.rope_base, freq_scale=1.0)
    q = gb.rope(gb.matmul(x, gb.rows(qkv, 0, d)), s.pos, **rope)
    k = gb.rope(gb.matmul(x, gb.rows(qkv, d, d)), s.pos, **rope)
    v = gb.matmul(x, gb.rows(qkv, 2 * d, d))
    a = gb.attention(q, k, v, kv[0], kv[1], s.cells, s.pos, s.seq, s.kv_pos, s.kv_seq, n_head=args.n_head,
                     n_head_kv=args.n_head, head_dim=hd, scale=hd ** -0.5, causal=False)

    def ffn(h: Value) -> Value:
        g = gb.swiglu(gb.matmul(h, w(f"{p}.ffn_gate.weight")), gb.matmul(h, w(f"{p}.ffn_up.weight")))
        return gb.matmul(g, w(f"{p}.ffn_down.weight"))
    return bert.attn_out_and_ffn(gb, args, i, x, gb.matmul(a, w(f"{p}.attn_output.weight")), w, ffn)


def build_graph(gb: GraphBuilder, args: BertArgs, layers: range, first: bool, last: bool,
                w: Callable[[str], Value], kv: Mapping[int, tuple[Value, Value]]) -> None:
    bert.build_graph(gb, args, layers, first, last, w, kv, build_layer)


def embed_rows(gb: GraphBuilder, args: BertArgs, layers: range, first: bool, w: Callable[[str], Value],
               kv: Mapping[int, tuple[Value, Value]]) -> Value:
    return bert.embed_rows(gb, args, layers, first, w, kv, build_layer)


__all__ = ["ENCODER_ONLY", "args_from_metadata", "build_graph", "embed_rows", "tensor_names"]
