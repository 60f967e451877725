"""GraphBuilder: write a ``pb.Graph`` with named values instead of raw value numbers."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from llamarpc.proto import pb
from llamarpc.proto.types import GGMLType, tensor_nbytes


@dataclasses.dataclass(frozen=True)
class Value:
    kind: str    # "input" | "tensor" | "op"
    index: int


@dataclasses.dataclass(frozen=True)
class TensorRef:
    buffer_id: int
    offset: int
    type: GGMLType
    shape: tuple[int, ...]


class GraphBuilder:
    def __init__(self) -> None:
        self._inputs: list[pb.GraphInput] = []
        self._tensors: list[pb.TensorRef] = []
        self._tensor_ids: dict[TensorRef, Value] = {}
        self._ops: list[tuple[int, tuple[Value, ...], dict]] = []
        self._outputs: list[tuple[str, Value]] = []

    # -- values -----------------------------------------------------------------------------------
    def input(self, name: str, type: GGMLType, shape: Sequence[int | str]) -> Value:
        dims = [pb.Dim(symbol=d) if isinstance(d, str) else pb.Dim(size=d) for d in shape]
        self._inputs.append(pb.GraphInput(name=name, type=int(type), shape=dims))
        return Value("input", len(self._inputs) - 1)

    def tensor(self, ref: TensorRef) -> Value:
        v = self._tensor_ids.get(ref)
        if v is None:
            self._tensors.append(pb.TensorRef(buffer_id=ref.buffer_id, offset=ref.offset,
                                              type=int(ref.type), shape=list(ref.shape)))
            v = self._tensor_ids[ref] = Value("tensor", len(self._tensors) - 1)
        return v

    def rows(self, v: Value, start: int, n: int) -> Value:
        """Rows [start, start + n) of a stored 2-d tensor, as a tensor of their own: a view of the same
        bytes (a fused QKV or gate-up weight's parts; the node wants the offset 32-byte aligned)."""
        if v.kind != "tensor":
            raise ValueError("rows() takes a stored tensor")
        t = self._tensors[v.index]
        typ, shape = GGMLType(t.type), tuple(t.shape)
        if len(shape) != 2 or not 0 <= start <= start + n <= shape[0]:
            raise ValueError(f"rows [{start}, {start + n}) of a tensor shaped {shape}")
        off = t.offset + (tensor_nbytes(typ, (start, shape[1])) if start else 0)
        return self.tensor(TensorRef(t.buffer_id, off, typ, (n, shape[1])))

    def op(self, op_type: int, *args: Value, **attrs: float | int) -> Value:
        self._ops.append((op_type, args, attrs))
        return Value("op", len(self._ops) - 1)

    def output(self, name: str, value: Value) -> None:
        self._outputs.append((name, value))

    # -- ops --------------------------------------------------------------------------------------
    def get_rows(self, table: Value, ids: Value) -> Value:
        return self.op(pb.GET_ROWS, table, ids)

    def rms_norm(self, x: Value, eps: float) -> Value:
        return self.op(pb.RMS_NORM, x, eps=eps)

    def head_rms_norm(self, x: Value, w: Value, eps: float, head_dim: int) -> Value:
        """QK-norm: each head's head_dim features of x[N, H*D] RMS-normalized, times w[head_dim]."""
        return self.op(pb.RMS_NORM, x, w, eps=eps, head_dim=head_dim)

    def layer_norm(self, x: Value, eps: float) -> Value:
        return self.op(pb.LAYER_NORM, x, eps=eps)

    def matmul(self, x: Value, w: Value) -> Value:
        return self.op(pb.MATMUL, x, w)

    def add(self, a: Value, b: Value) -> Value:
        return self.op(pb.ADD, a, b)

    def mul(self, a: Value, b: Value) -> Value:
        return self.op(pb.MUL, a, b)

    def scale(self, x: Value, s: float) -> Value:
        return self.op(pb.SCALE, x, scale=s)

    def rope(self, x: Value, pos: Value, *, head_dim: int, n_dims: int, mode: int,
             freq_base: float, freq_scale: float = 1.0) -> Value:
        return self.op(pb.ROPE, x, pos, head_dim=head_dim, n_dims=n_dims, rope_mode=mode,
                       freq_base=freq_base, freq_scale=freq_scale)

    def attention(self, q: Value, k: Value, v: Value, k_cache: Value, v_cache: Value, cells: Value,
                  tok_pos: Value, tok_seq: Value, kv_pos: Value, kv_seq: Value, *, n_head: int,
                  n_head_kv: int, head_dim: int, scale: float, sliding_window: int = 0,
                  softcap: float = 0.0, causal: bool = True) -> Value:
        return self.op(pb.ATTENTION, q, k, v, k_cache, v_cache, cells, tok_pos, tok_seq, kv_pos, kv_seq,
                       n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim, scale=scale,
                       sliding_window=sliding_window, softcap=softcap, non_causal=not causal)

    def silu(self, x: Value) -> Value:
        return self.op(pb.SILU, x)

    def gelu(self, x: Value) -> Value:
        return self.op(pb.GELU, x)

    def swiglu(self, gate: Value, up: Value) -> Value:
        return self.op(pb.SWIGLU, gate, up)

    def softcap(self, x: Value, cap: float) -> Value:
        return self.op(pb.SOFTCAP, x, scale=cap)

    def softmax(self, x: Value) -> Value:
        return self.op(pb.SOFTMAX, x)

    # -- result -----------------------------------------------------------------------------------
    def build(self) -> pb.Graph:
        n_in, n_t = len(self._inputs), len(self._tensors)

        def vid(v: Value) -> int:
            return v.index + {"input": 0, "tensor": n_in, "op": n_in + n_t}[v.kind]

        ops = [pb.Op(type=t, args=[vid(a) for a in args], attrs=pb.Attrs(**attrs)) for t, args, attrs in self._ops]
        outs = [pb.GraphOutput(name=n, value=vid(v)) for n, v in self._outputs]
        return pb.Graph(inputs=self._inputs, tensors=self._tensors, ops=ops, outputs=outs)
