"""bert: BERT encoders for embeddings and rerank (``general.architecture = bert``), as llama.cpp's
build_bert builds them.

- the input is the token embedding + the absolute position embedding (``position_embd``, the
  token's position in its input) + row 0 of ``token_types`` ("sequence A": llama.cpp passes no
  token types), then a LayerNorm with bias (``token_embd_norm``);
- each layer is post-norm: self-attention with biased Q/K/V/output projections over all of the
  input's tokens (non-causal: the node's ATTENTION with ``non_causal``), then add and LayerNorm
  (``attn_output_norm``); a GELU FFN with biases (``ffn_up``, ``ffn_down``), then add and LayerNorm
  (``layer_output_norm``). llama.cpp's LLM_FFN_GELU is ggml_gelu, the tanh form: so is our GELU;
- there is no rope, no output norm and no LM head: the layers' output is the embedding, pooled as
  ``bert.pooling_type`` says (embed.py), or scored by the classification head (``cls``,
  ``cls.output``) for rank.

An encoder has no logits: ``ENCODER_ONLY`` tells the engine that it cannot complete text, and the
generation graph (`build_graph`) of its last stage outputs the hidden rows of ``out_rows``; the
embedder builds on `embed_rows` and pools the first (CLS) row for rank.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from llamarpc.client import GraphBuilder, Value
from llamarpc.proto.types import GGMLType

from .llama import StepInputs, meta, step_inputs

ENCODER_ONLY = True
LAYER_TENSORS = ("attn_q", "attn_k", "attn_v", "attn_output", "attn_output_norm", "ffn_up", "ffn_down",
                 "layer_output_norm")


@dataclasses.dataclass(frozen=True)
class BertArgs:
    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_vocab: int
    n_ctx_train: int               # rows of position_embd: the longest input
    norm_eps: float
    pooling: int                   # GGUF's pooling_type: 0 none, 1 mean, 2 cls, 3 last, 4 rank
    token_types: bool              # token_types.weight present (row 0 is added)
    rope_base: float = 0.0         # > 0: rotary positions (nomic-bert) instead of position_embd
    tied_output: bool = False

    def __post_init__(self) -> None:
        if self.n_layer <= 0 or self.n_embd <= 0 or self.n_head <= 0 or self.n_ff <= 0 or self.n_embd % self.n_head:
            raise ValueError(f"bad model dimensions: {self}")
        if not 0 < self.norm_eps < 1:
            raise ValueError(f"bert.attention.layer_norm_epsilon must be in (0, 1), got {self.norm_eps}")

    @property
    def n_head_kv(self) -> int:
        return self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_dim(self) -> int:
        return self.n_embd


def args_from_metadata(md: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]]) -> BertArgs:
    a = meta(md, "general.architecture", required=True)
    for name in ("token_embd.weight", "position_embd.weight", "token_embd_norm.weight", "token_embd_norm.bias"):
        if name not in tensor_shapes:
            raise ValueError(f"missing tensor {name!r}")
    if "blk.0.attn_qkv.weight" in tensor_shapes:
        raise ValueError("bert with a fused attn_qkv tensor is not supported")
    n_head = int(meta(md, f"{a}.attention.head_count", required=True))
    n_head_kv = int(meta(md, f"{a}.attention.head_count_kv", n_head))
    if n_head_kv != n_head:
        raise ValueError(f"bert with head_count_kv {n_head_kv} != head_count {n_head} is not supported")
    if meta(md, f"{a}.attention.causal", False):
        raise ValueError("bert with causal attention is not supported")
    n_pos = int(tensor_shapes["position_embd.weight"][0])
    return BertArgs(
        arch=a,
        n_layer=int(meta(md, f"{a}.block_count", required=True)),
        n_embd=int(meta(md, f"{a}.embedding_length", required=True)),
        n_ff=int(meta(md, f"{a}.feed_forward_length", required=True)),
        n_head=n_head,
        n_vocab=int(tensor_shapes["token_embd.weight"][0]),
        n_ctx_train=min(int(meta(md, f"{a}.context_length", n_pos)), n_pos),
        norm_eps=float(meta(md, f"{a}.attention.layer_norm_epsilon", 1e-12)),
        pooling=int(meta(md, f"{a}.pooling_type", 0)),
        token_types="token_types.weight" in tensor_shapes,
    )


def layer_tensor_names(args: BertArgs, i: int) -> list[str]:
    return [f"blk.{i}.{n}.{k}" for n in LAYER_TENSORS for k in ("weight", "bias")]


def tensor_names(args: BertArgs, layers: range, first: bool, last: bool,
                 layer_names: Callable[[BertArgs, int], list[str]] = layer_tensor_names) -> list[str]:
    """The embeddings and their norm on the first stage, the layers; no output norm or head (the
    classification head is the embedder's, uploaded when --pooling rank needs it)."""
    names = ["token_embd.weight", "token_embd_norm.weight", "token_embd_norm.bias"] if first else []
    if first and args.rope_base <= 0:
        names.append("position_embd.weight")
    if first and args.token_types:
        names.append("token_types.weight")
    for i in layers:
        names += layer_names(args, i)
    return names


def _norm(gb: GraphBuilder, x: Value, w: Callable[[str], Value], name: str, eps: float) -> Value:
    """LayerNorm with weight and bias (llama.cpp's LLM_NORM)."""
    return gb.add(gb.mul(gb.layer_norm(x, eps), w(f"{name}.weight")), w(f"{name}.bias"))


def _linear(gb: GraphBuilder, x: Value, w: Callable[[str], Value], name: str) -> Value:
    return gb.add(gb.matmul(x, w(f"{name}.weight")), w(f"{name}.bias"))


def embed_inputs(gb: GraphBuilder, args: BertArgs, w: Callable[[str], Value], s: StepInputs) -> Value:
    x = gb.get_rows(w("token_embd.weight"), gb.input("tokens", GGMLType.I32, ("n",)))
    if args.token_types:
        x = gb.add(x, gb.rows(w("token_types.weight"), 0, 1))
    if args.rope_base <= 0:
        x = gb.add(gb.get_rows(w("position_embd.weight"), s.pos), x)
    return _norm(gb, x, w, "token_embd_norm", args.norm_eps)


def build_layer(gb: GraphBuilder, args: BertArgs, i: int, x: Value, w: Callable[[str], Value],
                kv: tuple[Value, Value], s: StepInputs) -> Value:
    p = f"blk.{i}"
    q = _linear(gb, x, w, f"{p}.attn_q")
    k = _linear(gb, x, w, f"{p}.attn_k")
    v = _linear(gb, x, w, f"{p}.attn_v")
    a = gb.attention(q, k, v, kv[0], kv[1], s.cells, s.pos, s.seq, s.kv_pos, s.kv_seq,
                     n_head=args.n_head, n_head_kv=args.n_head, head_dim=args.head_dim,
                     scale=args.head_dim ** -0.5, causal=False)
    return attn_out_and_ffn(gb, args, i, x, _linear(gb, a, w, f"{p}.attn_output"), w,
                            lambda h: _linear(gb, gb.gelu(_linear(gb, h, w, f"{p}.ffn_up")), w, f"{p}.ffn_down"))


def attn_out_and_ffn(gb: GraphBuilder, args: BertArgs, i: int, x: Value, a: Value, w: Callable[[str], Value],
                     ffn: Callable[[Value], Value]) -> Value:
    """The post-norm rest of a layer from its projected attention output `a`: add & LayerNorm, the
    FFN, add & LayerNorm."""
    p = f"blk.{i}"
    x = _norm(gb, gb.add(a, x), w, f"{p}.attn_output_norm", args.norm_eps)
    return _norm(gb, gb.add(ffn(x), x), w, f"{p}.layer_output_norm", args.norm_eps)


Layer = Callable[[GraphBuilder, BertArgs, int, Value, Callable[[str], Value], tuple[Value, Value], StepInputs], Value]


def _layers(gb: GraphBuilder, args: BertArgs, layers: range, first: bool, w: Callable[[str], Value],
            kv: Mapping[int, tuple[Value, Value]], layer: Layer = build_layer) -> Value:
    s = step_inputs(gb)
    x = embed_inputs(gb, args, w, s) if first else gb.input("hidden", GGMLType.F32, ("n", args.n_embd))
    for i in layers:
        x = layer(gb, args, i, x, w, kv[i], s)
    return x


def build_graph(gb: GraphBuilder, args: BertArgs, layers: range, first: bool, last: bool,
                w: Callable[[str], Value], kv: Mapping[int, tuple[Value, Value]], layer: Layer = build_layer) -> None:
    """Inputs as llama.build_graph's. Output: `hidden` (every row) on a stage that is not the last,
    else `hidden` of the `out_rows` rows: an encoder has no logits."""
    x = _layers(gb, args, layers, first, w, kv, layer)
    if last:
        x = gb.get_rows(x, gb.input("out_rows", GGMLType.I32, ("r",)))
    gb.output("hidden", x)


def embed_rows(gb: GraphBuilder, args: BertArgs, layers: range, first: bool, w: Callable[[str], Value],
               kv: Mapping[int, tuple[Value, Value]], layer: Layer = build_layer) -> Value:
    """The rows the embedder pools (embed.py): the last layer's output, as llama.cpp's t_embd."""
    return _layers(gb, args, layers, first, w, kv, layer)
