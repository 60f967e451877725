"""llama: Llama 1/2/3, Mistral, TinyLlama, SmolLM2 (``general.architecture = llama``).

Parameters keep their GGUF names (``blk.{i}.attn_q.weight``); a layer-range graph is built with
the GraphBuilder from a lookup of those names. GGUF's llama Q/K weights are stored permuted for
ggml's "normal" rope (adjacent pairs), so rope mode 0 is used here.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from llamarpc.client import GraphBuilder, Value
from llamarpc.proto.types import GGMLType

ROPE_NORMAL = 0
ROPE_NEOX = 2


def meta(md: Mapping[str, Any], key: str, default: Any = None, *, required: bool = False) -> Any:
    """A metadata value, the default when absent, or a ValueError naming a required key."""
    if key in md:
        return md[key]
    if required:
        raise ValueError(f"model metadata is missing {key!r}")
    return default


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    n_ctx_train: int
    rms_eps: float
    rope_base: float = 10000.0
    rope_scale: float = 1.0          # freq_scale = 1 / linear scaling factor
    head_dim: int = 0                # 0: n_embd // n_head
    n_rot: int = 0                   # 0: head_dim
    rope_mode: int = ROPE_NORMAL
    qkv_bias: bool = False
    qk_norm: bool = False            # per-head RMS norm of Q and K before rope (qwen3)
    sliding_window: int = 0          # every layer (phi3)
    tied_output: bool = False

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.n_embd // self.n_head)
        if self.n_rot == 0:
            object.__setattr__(self, "n_rot", self.head_dim)
        if self.n_head % self.n_head_kv:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_head_kv {self.n_head_kv}")
        if self.n_layer <= 0 or self.n_embd <= 0 or self.n_head <= 0:
            raise ValueError(f"bad model dimensions: {self}")

    @property
    def kv_dim(self) -> int:
        return self.n_head_kv * self.head_dim

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]],
                      **overrides: Any) -> ModelArgs:
        a = meta(md, "general.architecture", required=True)
        n_head = int(meta(md, f"{a}.attention.head_count", required=True))
        scaling = meta(md, f"{a}.rope.scaling.type", "none")
        factor = float(meta(md, f"{a}.rope.scaling.factor", 1.0) or 1.0)
        emb = tensor_shapes.get("token_embd.weight")
        if emb is None:
            raise ValueError("missing tensor 'token_embd.weight'")
        fields: dict[str, Any] = dict(
            arch=a,
            n_layer=int(meta(md, f"{a}.block_count", required=True)),
            n_embd=int(meta(md, f"{a}.embedding_length", required=True)),
            n_ff=int(meta(md, f"{a}.feed_forward_length", required=True)),
            n_head=n_head,
            n_head_kv=int(meta(md, f"{a}.attention.head_count_kv", n_head)),
            n_vocab=int(emb[0]),
            n_ctx_train=int(meta(md, f"{a}.context_length", 2048)),
            rms_eps=float(meta(md, f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_base=float(meta(md, f"{a}.rope.freq_base", 10000.0)),
            rope_scale=1.0 / factor if scaling == "linear" else 1.0,
            head_dim=int(meta(md, f"{a}.attention.key_length", 0)),
            n_rot=int(meta(md, f"{a}.rope.dimension_count", 0)),
            tied_output="output.weight" not in tensor_shapes,
        )
        fields.update(overrides)
        return cls(**fields)


def args_from_metadata(md: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]]) -> ModelArgs:
    return ModelArgs.from_metadata(md, tensor_shapes)


def layer_tensor_names(args: ModelArgs, i: int) -> list[str]:
    names = [f"blk.{i}.{n}.weight" for n in
             ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")]
    if args.qkv_bias:
        names += [f"blk.{i}.attn_{n}.bias" for n in ("q", "k", "v")]
    if args.qk_norm:
        names += [f"blk.{i}.attn_{n}_norm.weight" for n in ("q", "k")]
    return names


def tensor_names(args: Any, layers: range, first: bool, last: bool,
                 layer_names: Callable[[Any, int], list[str]] = layer_tensor_names) -> list[str]:
    """The tensors a stage holding `layers` needs (the embedding on the first stage, the output
    norm and head on the last); `layer_names` gives one layer's (each architecture its own)."""
    names = ["token_embd.weight"] if first else []
    for i in layers:
        names += layer_names(args, i)
    if last:
        names += ["output_norm.weight", "token_embd.weight" if args.tied_output else "output.weight"]
    return list(dict.fromkeys(names))


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """The per-step inputs every layer graph shares (see proto ATTENTION)."""
    pos: Value
    seq: Value
    cells: Value
    kv_pos: Value
    kv_seq: Value


def step_inputs(gb: GraphBuilder) -> StepInputs:
    return StepInputs(
        pos=gb.input("pos", GGMLType.I32, ("n",)),
        seq=gb.input("seq", GGMLType.I32, ("n",)),
        cells=gb.input("cells", GGMLType.I32, ("n",)),
        kv_pos=gb.input("kv_pos", GGMLType.I32, ("L",)),
        kv_seq=gb.input("kv_seq", GGMLType.I32, ("L",)),
    )


def _linear(gb: GraphBuilder, x: Value, w: Callable[[str], Value], name: str, bias: bool) -> Value:
    y = gb.matmul(x, w(f"{name}.weight"))
    return gb.add(y, w(f"{name}.bias")) if bias else y


def build_layer(gb: GraphBuilder, args: ModelArgs, i: int, x: Value, w: Callable[[str], Value],
                kv: tuple[Value, Value], s: StepInputs) -> Value:
    p = f"blk.{i}"
    h = gb.mul(gb.rms_norm(x, args.rms_eps), w(f"{p}.attn_norm.weight"))
    q = _linear(gb, h, w, f"{p}.attn_q", args.qkv_bias)
    k = _linear(gb, h, w, f"{p}.attn_k", args.qkv_bias)
    v = _linear(gb, h, w, f"{p}.attn_v", args.qkv_bias)
    return attend_and_ffn(gb, args, i, x, q, k, v, w, kv, s)


def rope_attrs(args: ModelArgs, i: int) -> dict:
    """Layer i's rope (GraphBuilder.rope's keywords): the K cache holds K turned by these."""
    return dict(head_dim=args.head_dim, n_dims=args.n_rot, mode=args.rope_mode,
                freq_base=args.rope_base, freq_scale=args.rope_scale)


def attend_and_ffn(gb: GraphBuilder, args: ModelArgs, i: int, x: Value, q: Value, k: Value, v: Value,
                   w: Callable[[str], Value], kv: tuple[Value, Value], s: StepInputs,
                   ffn: Callable[[Value], Value] | None = None) -> Value:
    """The rest of a llama block from its Q, K, V: (QK-norm,) rope, attention, output projection and
    residual, then the FFN (SwiGLU of ffn_gate/ffn_up unless `ffn` is given) and its residual."""
    p = f"blk.{i}"
    if args.qk_norm:
        q = gb.head_rms_norm(q, w(f"{p}.attn_q_norm.weight"), args.rms_eps, args.head_dim)
        k = gb.head_rms_norm(k, w(f"{p}.attn_k_norm.weight"), args.rms_eps, args.head_dim)
    rope = rope_attrs(args, i)
    q = gb.rope(q, s.pos, **rope)
    k = gb.rope(k, s.pos, **rope)
    a = gb.attention(q, k, v, kv[0], kv[1], s.cells, s.pos, s.seq, s.kv_pos, s.kv_seq,
                     n_head=args.n_head, n_head_kv=args.n_head_kv, head_dim=args.head_dim,
                     scale=args.head_dim ** -0.5, sliding_window=args.sliding_window)
    x = gb.add(x, gb.matmul(a, w(f"{p}.attn_output.weight")))
    h = gb.mul(gb.rms_norm(x, args.rms_eps), w(f"{p}.ffn_norm.weight"))
    if ffn is None:
        f = gb.swiglu(gb.matmul(h, w(f"{p}.ffn_gate.weight")), gb.matmul(h, w(f"{p}.ffn_up.weight")))
    else:
        f = ffn(h)
    return gb.add(x, gb.matmul(f, w(f"{p}.ffn_down.weight")))


Layer = Callable[[GraphBuilder, ModelArgs, int, Value, Callable[[str], Value], tuple[Value, Value], StepInputs], Value]


def build_graph(gb: GraphBuilder, args: ModelArgs, layers: range, first: bool, last: bool,
                w: Callable[[str], Value], kv: Mapping[int, tuple[Value, Value]], layer: Layer | None = None) -> None:
    """Inputs: tokens I32[n] (first stage) or hidden F32[n, n_embd]; the StepInputs; out_rows
    I32[r] (last stage). Output: logits F32[r, n_vocab] (last stage) or hidden."""
    if first:
        x = gb.get_rows(w("token_embd.weight"), gb.input("tokens", GGMLType.I32, ("n",)))
    else:
        x = gb.input("hidden", GGMLType.F32, ("n", args.n_embd))
    s = step_inputs(gb)
    for i in layers:
        x = (layer or build_layer)(gb, args, i, x, w, kv[i], s)
    if not last:
        gb.output("hidden", x)
        return
    rows = gb.get_rows(x, gb.input("out_rows", GGMLType.I32, ("r",)))
    h = gb.mul(gb.rms_norm(rows, args.rms_eps), w("output_norm.weight"))
    gb.output("logits", gb.matmul(h, w("token_embd.weight" if args.tied_output else "output.weight")))
