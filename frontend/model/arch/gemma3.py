"""gemma3: Gemma 3 text models (``general.architecture = gemma3``), as llama.cpp builds them.

Differences from the llama block, each from llama.cpp's gemma3 graph:

- the token embeddings are scaled by sqrt(n_embd);
- Q and K are RMS-normalized per head (QK-norm, ``attn_q_norm`` / ``attn_k_norm`` [head_dim]) before
  a neox rope; Q is scaled by 1/sqrt(head_dim) (``query_pre_attn_scalar`` = head_dim);
- layers are local (sliding-window attention, rope base 10000) or global (full attention, the
  rope base and linear scaling of the metadata): llama.cpp's rule is every 6th layer global
  (``il % 6 == 5``); ``gemma3.attention.sliding_window_pattern`` overrides it when present (an int
  period, or one bool per layer, true = local);
- the attention output and the FFN output are RMS-normalized again before their residual add
  (``post_attention_norm``, ``post_ffw_norm``); the FFN is GELU(tanh)-gated;
- the output head is the token embedding (tied) unless ``output.weight`` exists; the final logits
  are soft-capped when the metadata has ``gemma3.final_logit_softcapping`` (Gemma 3 has none,
  Gemma 2 had 30), and so are the attention scores with ``gemma3.attn_logit_softcapping``.

GGUF's Gemma norm weights already include HF's ``1 +`` (the converter adds it), so every norm is
a plain RMS_NORM times its weight.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

from llamarpc.client import GraphBuilder, Value
from llamarpc.proto.types import GGMLType

from . import llama
from .llama import ROPE_NEOX, StepInputs, meta, step_inputs

SWA_PERIOD = 6            # llama.cpp: hparams.set_swa_pattern(6) for gemma3
ROPE_BASE_LOCAL = 10000.0  # llama.cpp: rope_freq_base_train_swa


def _local_layers(md: Mapping[str, Any], a: str, n_layer: int, window: int) -> tuple[bool, ...]:
    if window <= 0:
        return (False,) * n_layer
    pattern = meta(md, f"{a}.attention.sliding_window_pattern", SWA_PERIOD)
    if isinstance(pattern, (list, tuple)):
        if len(pattern) != n_layer:
            raise ValueError(f"{a}.attention.sliding_window_pattern has {len(pattern)} entries for {n_layer} layers")
        return tuple(bool(p) for p in pattern)
    period = int(pattern)
    if period < 0:
        raise ValueError(f"{a}.attention.sliding_window_pattern must be >= 0, got {period}")
    # llama.cpp's set_swa_pattern(n): layer il is local when il % n < n - 1; 0 or 1: all global
    return tuple(period > 1 and il % period < period - 1 for il in range(n_layer))


@dataclasses.dataclass(frozen=True)
class Gemma3Args:
    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ctx_train: int
    rms_eps: float
    sliding_window: int                 # 0: no local layers
    local_layers: tuple[bool, ...]      # per layer: sliding-window attention (local rope base)
    rope_base: float = 1000000.0        # global layers
    rope_scale: float = 1.0             # global layers: 1 / linear scaling factor
    rope_base_local: float = ROPE_BASE_LOCAL
    attn_scale: float = 0.0             # 0: head_dim ** -0.5
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    tied_output: bool = True

    def __post_init__(self) -> None:
        if self.n_layer <= 0 or self.n_embd <= 0 or self.n_head <= 0 or self.head_dim <= 0 or self.n_head_kv <= 0:
            raise ValueError(f"bad model dimensions: {self}")
        if self.n_head % self.n_head_kv:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_head_kv {self.n_head_kv}")
        if len(self.local_layers) != self.n_layer:
            raise ValueError("local_layers needs one entry per layer")
        if self.attn_scale == 0.0:
            object.__setattr__(self, "attn_scale", self.head_dim ** -0.5)

    @property
    def kv_dim(self) -> int:
        return self.n_head_kv * self.head_dim

    def rope(self, i: int) -> tuple[float, float]:
        """(freq_base, freq_scale) of layer i."""
        return (self.rope_base_local, 1.0) if self.local_layers[i] else (self.rope_base, self.rope_scale)


def args_from_metadata(md: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]]) -> Gemma3Args:
    a = meta(md, "general.architecture", required=True)
    n_layer = int(meta(md, f"{a}.block_count", required=True))
    n_head = int(meta(md, f"{a}.attention.head_count", required=True))
    n_embd = int(meta(md, f"{a}.embedding_length", required=True))
    emb = tensor_shapes.get("token_embd.weight")
    if emb is None:
        raise ValueError("missing tensor 'token_embd.weight'")
    window = int(meta(md, f"{a}.attention.sliding_window", 0) or 0)
    scaling = meta(md, f"{a}.rope.scaling.type", "none")
    factor = float(meta(md, f"{a}.rope.scaling.factor", 1.0) or 1.0)
    head_dim = int(meta(md, f"{a}.attention.key_length", n_embd // n_head))
    value_dim = int(meta(md, f"{a}.attention.value_length", head_dim))
    if value_dim != head_dim:
        raise ValueError(f"key_length {head_dim} != value_length {value_dim} is not supported")
    return Gemma3Args(
        arch=a, n_layer=n_layer, n_embd=n_embd,
        n_ff=int(meta(md, f"{a}.feed_forward_length", required=True)),
        n_head=n_head, n_head_kv=int(meta(md, f"{a}.attention.head_count_kv", n_head)),
        head_dim=head_dim, n_vocab=int(emb[0]),
        n_ctx_train=int(meta(md, f"{a}.context_length", 8192)),
        rms_eps=float(meta(md, f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
        sliding_window=window, local_layers=_local_layers(md, a, n_layer, window),
        rope_base=float(meta(md, f"{a}.rope.freq_base", 1000000.0)),
        rope_scale=1.0 / factor if scaling == "linear" else 1.0,
        attn_softcap=float(meta(md, f"{a}.attn_logit_softcapping", 0.0) or 0.0),
        final_softcap=float(meta(md, f"{a}.final_logit_softcapping", 0.0) or 0.0),
        tied_output="output.weight" not in tensor_shapes,
    )


LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_q_norm", "attn_k_norm", "attn_output",
                 "post_attention_norm", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down", "post_ffw_norm")


def layer_tensor_names(args: Gemma3Args, i: int) -> list[str]:
    return [f"blk.{i}.{n}.weight" for n in LAYER_TENSORS]


def tensor_names(args: Gemma3Args, layers: range, first: bool, last: bool) -> list[str]:
    return llama.tensor_names(args, layers, first, last, layer_tensor_names)


def _norm(gb: GraphBuilder, x: Value, w: Value, eps: float) -> Value:
    return gb.mul(gb.rms_norm(x, eps), w)


def rope_attrs(args: Gemma3Args, i: int) -> dict:
    """Layer i's rope (GraphBuilder.rope's keywords): neox, the local or the global base."""
    base, scale = args.rope(i)
    return dict(head_dim=args.head_dim, n_dims=args.head_dim, mode=ROPE_NEOX, freq_base=base, freq_scale=scale)


def build_layer(gb: GraphBuilder, args: Gemma3Args, i: int, x: Value, w: Callable[[str], Value],
                kv: tuple[Value, Value], s: StepInputs) -> Value:
    p = f"blk.{i}"
    eps, hd = args.rms_eps, args.head_dim
    h = _norm(gb, x, w(f"{p}.attn_norm.weight"), eps)
    q = gb.matmul(h, w(f"{p}.attn_q.weight"))
    k = gb.matmul(h, w(f"{p}.attn_k.weight"))
    v = gb.matmul(h, w(f"{p}.attn_v.weight"))
    q = gb.head_rms_norm(q, w(f"{p}.attn_q_norm.weight"), eps, hd)
    k = gb.head_rms_norm(k, w(f"{p}.attn_k_norm.weight"), eps, hd)
    rope = rope_attrs(args, i)
    q = gb.rope(q, s.pos, **rope)
    k = gb.rope(k, s.pos, **rope)
    a = gb.attention(q, k, v, kv[0], kv[1], s.cells, s.pos, s.seq, s.kv_pos, s.kv_seq,
                     n_head=args.n_head, n_head_kv=args.n_head_kv, head_dim=hd, scale=args.attn_scale,
                     sliding_window=args.sliding_window if args.local_layers[i] else 0,
                     softcap=args.attn_softcap)
    a = _norm(gb, gb.matmul(a, w(f"{p}.attn_output.weight")), w(f"{p}.post_attention_norm.weight"), eps)
    x = gb.add(x, a)
    h = _norm(gb, x, w(f"{p}.ffn_norm.weight"), eps)
    f = gb.mul(gb.gelu(gb.matmul(h, w(f"{p}.ffn_gate.weight"))), gb.matmul(h, w(f"{p}.ffn_up.weight")))
    f = _norm(gb, gb.matmul(f, w(f"{p}.ffn_down.weight")), w(f"{p}.post_ffw_norm.weight"), eps)
    return gb.add(x, f)


def build_graph(gb: GraphBuilder, args: Gemma3Args, layers: range, first: bool, last: bool,
                w: Callable[[str], Value], kv: Mapping[int, tuple[Value, Value]]) -> None:
    """The same inputs and outputs as llama.build_graph (tokens or hidden in, hidden or logits out)."""
    if first:
        x = gb.get_rows(w("token_embd.weight"), gb.input("tokens", GGMLType.I32, ("n",)))
        x = gb.scale(x, math.sqrt(args.n_embd))
    else:
        x = gb.input("hidden", GGMLType.F32, ("n", args.n_embd))
    s = step_inputs(gb)
    for i in layers:
        x = build_layer(gb, args, i, x, w, kv[i], s)
    if not last:
        gb.output("hidden", x)
        return
    rows = gb.get_rows(x, gb.input("out_rows", GGMLType.I32, ("r",)))
    h = _norm(gb, rows, w("output_norm.weight"), args.rms_eps)
    logits = gb.matmul(h, w("token_embd.weight" if args.tied_output else "output.weight"))
    if args.final_softcap > 0:
        logits = gb.softcap(logits, args.final_softcap)
    gb.output("logits", logits)

