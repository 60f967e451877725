"""Running a compiled plan: one Compute binds the inputs, runs each step through the op -> kernel
table of the node's device, and returns the named outputs.

Stored weights are never copied to float32: a MATMUL whose weight is a stored tensor reads its
GGUF blocks (`quant.matmul` on the CPU, `quant.cuda` on a CUDA device), a GET_ROWS from a stored
table dequantizes only the rows asked for. Other ops that take a stored tensor (norm weights,
biases: small F32 vectors in practice) see a float view of it, converted for this Compute only
when its type is not F32. Intermediates live until their last reader.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from llamarpc.proto import pb
from llamarpc.proto.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from llamarpc.proto.types import ACTIVATION_DTYPES, PLAIN_DTYPES, GGMLType

from . import kernels as K
from . import program, quant
from .graph import MAX_POOL_WORK, MAX_SYMBOL_VALUE, MIN_SCRATCH, SCRATCH_FACTOR, OpSpec, Plan, TensorSpec, kind_name
from .memory import Memory
from .quant import ops as cpu_ops
from .quant import reference as quant_ref


class Ctx:
    """What a kernel sees of one Compute: its values, the stored tensors and the device."""

    def __init__(self, plan: Plan, memory: Memory, session: str, mode: str, values: list[Any]) -> None:
        self.plan, self.memory, self.session, self.mode = plan, memory, session, mode
        self.dev = memory.device
        self.xp = self.dev.xp
        self.values = values
        self.n_in, self.n_t = len(plan.inputs), len(plan.tensors)
        self.rope_memo: dict = {}

    def stored(self, idx: int) -> bool:
        return self.n_in <= idx < self.n_in + self.n_t

    def spec(self, idx: int) -> TensorSpec:
        return self.plan.tensors[idx - self.n_in]

    def raw(self, idx: int) -> Any:
        """The stored tensor's bytes as a view (typed for plain types, block rows otherwise)."""
        view = self.plan.views.get(idx)
        if view is None:
            ts = self.spec(idx)
            view = self.memory.view(self.session, ts.buffer_id, ts.offset, ts.type, ts.shape)[1]
            self.plan.views[idx] = view
        return view

    def weight(self, idx: int) -> quant.QWeight:
        w = self.plan.weights.get(idx)
        if w is None:
            ts = self.spec(idx)
            w = quant.QWeight(self.raw(idx), ts.type, math.prod(ts.shape[:-1]), ts.shape[-1])
            self.plan.weights[idx] = w
        return w

    def arg(self, idx: int) -> Any:
        if not self.stored(idx):
            return self.values[idx]
        v = self.values[idx]
        if v is None:
            ts, raw = self.spec(idx), self.raw(idx)
            if ts.type == GGMLType.F32:
                v = raw
            elif ts.type in PLAIN_DTYPES:
                v = self.xp.astype(raw, self.xp.float32)
            else:   # a quantized tensor used as a plain operand: converted for this Compute only
                host = quant_ref.dequantize(self.dev.to_host(raw), ts.type, ts.shape[-1])
                v = self.dev.to_device(host.reshape(ts.shape))
            self.values[idx] = v
        return v

    def shape(self, idx: int) -> tuple[int, ...]:
        v = self.values[idx]
        return v.shape if v is not None else self.plan.tensors[idx - self.n_in].shape


def _check_rows(ts: TensorSpec, ids: np.ndarray) -> None:
    if len(ts.shape) != 2:
        raise InvalidArgument(f"get_rows: the table must be 2-d, got {list(ts.shape)}")
    if ids.dtype.kind not in "iu":
        raise InvalidArgument(f"get_rows: ids must be I32, not {ids.dtype}")
    if ids.ndim != 1 or (ids.size and (int(ids.min()) < 0 or int(ids.max()) >= ts.shape[0])):
        raise InvalidArgument(f"get_rows: ids must be a 1-d array in [0, {ts.shape[0]})")


def _get_rows(c: Ctx, op: OpSpec) -> Any:
    a = op.args
    if not c.stored(a[0]):
        return K.get_rows(c.xp, c.arg(a[0]), c.arg(a[1]))
    ts = c.spec(a[0])
    ids = c.dev.to_host(c.arg(a[1]))
    _check_rows(ts, ids)
    if c.dev.is_cpu:
        return quant.gather_rows(c.weight(a[0]), ids)
    from .quant import cuda
    return cuda.gather_rows(c.raw(a[0]), ts.type, ts.shape, c.dev.to_device(ids.astype(np.int32)))


def _matmul(c: Ctx, op: OpSpec) -> Any:
    return _matmul_weight(c, c.arg(op.args[0]), op.args[1])


def _matmul_weight(c: Ctx, x: Any, w_i: int) -> Any:
    ts = c.spec(w_i) if c.stored(w_i) else None
    if ts is None or ts.type == GGMLType.F32 or ts.type not in quant.TYPES or len(ts.shape) != 2:
        return K.matmul(c.xp, x, c.arg(w_i))    # a value, or a stored tensor with no block kernel (I32): plain
    K._rows2d(x, "matmul")
    K._check(x.shape[1] == ts.shape[1], f"matmul: x {tuple(x.shape)} and weight {ts.shape} do not agree on K")
    if c.dev.is_cpu:
        return quant.matmul(x, c.weight(w_i), c.mode)
    from .quant import cuda
    return cuda.matmul(x, c.raw(w_i), ts.type, ts.shape)


def _attention(c: Ctx, op: OpSpec) -> Any:
    a, at = op.args, op.attrs
    if c.dev.is_cpu:
        return cpu_ops.attention(c.arg(a[0]), c.arg(a[1]), c.arg(a[2]), c.raw(a[3]), c.raw(a[4]), *(c.arg(i) for i in a[5:10]),
                                 n_head=at.n_head, n_head_kv=at.n_head_kv, head_dim=at.head_dim, scale=at.scale,
                                 sliding_window=at.sliding_window, softcap_=at.softcap, causal=not at.non_causal)
    return K.attention(c.xp, c.arg(a[0]), c.arg(a[1]), c.arg(a[2]), c.raw(a[3]), c.raw(a[4]),
                       *(c.arg(i) for i in a[5:10]), n_head=at.n_head, n_head_kv=at.n_head_kv,
                       head_dim=at.head_dim, scale=at.scale, sliding_window=at.sliding_window, softcap_=at.softcap,
                       causal=not at.non_causal)


def _rope(c: Ctx, op: OpSpec) -> Any:
    at = op.attrs
    x, pos = c.arg(op.args[0]), c.arg(op.args[1])
    if c.dev.is_cpu:
        return cpu_ops.rope(x, pos, at.head_dim, at.n_dims, at.rope_mode, at.freq_base, at.freq_scale)
    return K.rope(c.xp, x, pos, at.head_dim, at.n_dims, at.rope_mode, at.freq_base, at.freq_scale, memo=c.rope_memo)


def _rope_shift(c: Ctx, op: OpSpec) -> Any:
    at, a = op.attrs, op.args
    cells, delta = c.arg(a[1]), c.arg(a[2])
    if cells.dtype != np.int32 or delta.dtype != np.int32:
        raise InvalidArgument("rope_shift: cells and delta must be I32")
    cache = c.raw(a[0])
    if not getattr(getattr(cache, "flags", None), "writeable", True):
        raise InvalidArgument("rope_shift: the K cache is in a read-only (mapped) buffer")
    return K.rope_shift(c.xp, cache, cells, delta, at.head_dim, at.n_dims, at.rope_mode, at.freq_base,
                        at.freq_scale)


def _pool(c: Ctx, op: OpSpec) -> Any:
    x, seq = c.arg(op.args[0]), c.arg(op.args[1])
    n_seq = int(c.xp.max(seq)) + 1 if seq.shape[0] else 0
    if n_seq * max(1, math.prod(c.shape(op.args[0]))) > MAX_POOL_WORK:
        raise ResourceExhausted(f"pool: {n_seq} sequences over {list(c.shape(op.args[0]))} is too much work")
    return K.pool(c.xp, x, seq, op.attrs.pooling, n_seq)


def _rms_norm(c: Ctx, op: OpSpec) -> Any:
    x, eps, g = c.arg(op.args[0]), op.attrs.eps, op.attrs.head_dim
    w = c.arg(op.args[1]) if len(op.args) > 1 else None
    if g == 0 and w is None:
        return cpu_ops.rms_norm(x, eps) if c.dev.is_cpu else K.rms_norm(c.xp, x, eps)
    if not c.dev.is_cpu:
        return K.rms_norm_groups(c.xp, x, eps, g, w)   # groups of head_dim (QK-norm), times w
    K.check_groups(x, g, w)
    g = g or x.shape[1]
    return cpu_ops.rms_norm(np.reshape(x, (-1, g)), eps, w).reshape(x.shape)


def _unary(fn: Callable[[Any, Any], Any]) -> Callable[[Ctx, OpSpec], Any]:
    return lambda c, op: fn(c.xp, c.arg(op.args[0]))


def _binary(fn: Callable[[Any, Any, Any], Any]) -> Callable[[Ctx, OpSpec], Any]:
    return lambda c, op: fn(c.xp, c.arg(op.args[0]), c.arg(op.args[1]))


Kernel = Callable[[Ctx, OpSpec], Any]

# op -> kernel; the device-specific parts (matmul, get_rows) look at the device themselves
KERNELS: dict[int | str, Kernel] = {
    pb.GET_ROWS: _get_rows,
    pb.RMS_NORM: _rms_norm,
    pb.LAYER_NORM: lambda c, op: K.layer_norm(c.xp, c.arg(op.args[0]), op.attrs.eps),
    pb.MATMUL: _matmul,
    pb.ADD: _binary(K.add),
    pb.MUL: _binary(K.mul),
    pb.SCALE: lambda c, op: c.arg(op.args[0]) * op.attrs.scale,
    pb.ROPE: _rope,
    pb.ATTENTION: _attention,
    pb.SILU: _unary(K.silu),
    pb.GELU: _unary(K.gelu),
    pb.SWIGLU: lambda c, op: (cpu_ops.swiglu(c.arg(op.args[0]), c.arg(op.args[1])) if c.dev.is_cpu
                              else K.swiglu(c.xp, c.arg(op.args[0]), c.arg(op.args[1]))),
    pb.SOFTMAX: _unary(K.softmax),
    pb.SOFTCAP: lambda c, op: K.softcap(c.xp, c.arg(op.args[0]), op.attrs.scale),
    pb.POOL: _pool,
    pb.ROPE_SHIFT: _rope_shift,
}
assert set(KERNELS) == set(K.OP_ARITY), "every op in the op set has a kernel"  # fuse.py adds its own

# kernels of fused steps (see fuse.py) and the bytes they allocate; registered by fuse.py
FUSED_BYTES: dict[str, Callable[[Ctx, Any], tuple[int, int]]] = {}


def bind_inputs(plan: Plan, given: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Check the Compute inputs against the declarations and bind the symbols consistently."""
    extra = set(given) - {s.name for s in plan.inputs}
    if extra:
        raise InvalidArgument(f"unknown inputs: {sorted(extra)}")
    syms: dict[str, int] = {}
    out = []
    for spec in plan.inputs:
        a = given.get(spec.name)
        if a is None:
            raise InvalidArgument(f"missing input {spec.name!r}")
        if a.dtype != ACTIVATION_DTYPES[spec.type]:
            raise InvalidArgument(f"input {spec.name!r}: expected {spec.type.name}, got {a.dtype}")
        if a.ndim != len(spec.shape):
            raise InvalidArgument(f"input {spec.name!r}: expected {len(spec.shape)} dims, got shape {list(a.shape)}")
        for d, n in zip(spec.shape, a.shape):
            if isinstance(d, str):
                if n > MAX_SYMBOL_VALUE:
                    raise InvalidArgument(f"input {spec.name!r}: dimension {d}={n} is too large")
                if syms.setdefault(d, n) != n:
                    raise InvalidArgument(f"input {spec.name!r}: symbol {d} is {n} here but {syms[d]} elsewhere")
            elif d != n:
                raise InvalidArgument(f"input {spec.name!r}: expected shape {list(spec.shape)}, got {list(a.shape)}")
        out.append(a)
    return out


def _op_bytes(t: int, shapes: list[tuple[int, ...]], attrs: Any) -> tuple[int, int]:
    """(kept, transient) bytes an op is about to allocate, from its argument shapes alone: the
    output (which lives until the Compute ends) and the temporaries it makes on the way."""
    kept = max((math.prod(s) for s in shapes), default=0)   # elementwise, norms, rope, pool, attention out
    transient = 2 * kept
    if t in (pb.ADD, pb.MUL):
        try:
            kept = math.prod(np.broadcast_shapes(shapes[0], shapes[1]))
        except ValueError:
            pass   # the kernel reports the mismatch
    elif t == pb.MATMUL and shapes[0] and shapes[1]:
        kept = shapes[0][0] * shapes[1][0]
        transient = quant.TILE_BYTES // 4 + 2 * shapes[0][0] * shapes[0][-1]   # a weight tile, x quantized
    elif t == pb.GET_ROWS and shapes[0] and shapes[1]:
        kept = shapes[1][0] * shapes[0][-1]
    elif t == pb.ROPE_SHIFT and shapes[0] and shapes[1]:
        kept, transient = shapes[1][0], 4 * shapes[1][0] * shapes[0][-1]   # the cells; rows, turned, cos/sin
    elif t == pb.ATTENTION and shapes[0] and shapes[8]:
        transient = 3 * max(0, attrs.n_head) * shapes[0][0] * shapes[8][0]   # scores, exp, probs
    return 4 * kept, 4 * transient


def step_bytes(c: Ctx, step: Any) -> tuple[int, int]:
    """(kept, transient) bytes a step is about to allocate, from its argument shapes."""
    if isinstance(step.kind, int):
        return _op_bytes(step.kind, [c.shape(i) for i in step.args], step.attrs)
    return FUSED_BYTES[step.kind](c, step)


_MISSING = object()


def execute(plan: Plan, memory: Memory, session: str, given: dict[str, np.ndarray],
            mode: str = "exact") -> dict[str, np.ndarray]:
    if not plan.alive:
        raise FailedPrecondition("the graph references a buffer that was freed; register it again")
    dev = memory.device
    host_inputs = bind_inputs(plan, given)
    limit = max(SCRATCH_FACTOR * memory.capacity, MIN_SCRATCH)
    shapes: dict[int, tuple] | None = None
    sig = None
    if dev.is_cpu and mode != "reference" and program.ENABLED:
        sig = program.signature(plan, host_inputs, mode)
        prog = plan.programs.get(sig, _MISSING)
        if prog is _MISSING:
            shapes = {i: (a.shape, a.dtype) for i, a in enumerate(host_inputs)}   # recorded: see below
        elif prog is not None and prog.lock.acquire(blocking=False):   # (busy: this Compute goes step by step)
            try:
                out = prog.run(plan, KERNELS, lambda values: Ctx(plan, memory, session, mode, values), host_inputs,
                               limit)
            finally:
                prog.lock.release()
            if out is not None:
                return out
    values: list[Any] = [dev.to_device(a) for a in host_inputs] + [None] * (len(plan.tensors) + len(plan.ops))
    c = Ctx(plan, memory, session, mode, values)
    scratch = 0
    step = plan.steps[0]
    try:
        for step, release in zip(plan.steps, plan.release):
            kept, transient = step_bytes(c, step)
            if scratch + kept + transient > limit:
                raise ResourceExhausted(
                    f"op {step.ops[0]} ({kind_name(step.kind)}) would need {kept + transient} bytes on top of "
                    f"{scratch} already held by this Compute; the limit is {limit}")
            scratch += kept
            out = KERNELS[step.kind](c, step)
            if len(step.outs) == 1:
                values[step.outs[0]] = out
            else:
                for v, o in zip(step.outs, out):
                    values[v] = o
            if shapes is not None:
                for v in step.outs:
                    shapes[v] = (values[v].shape, values[v].dtype)
            for v in release:   # intermediates live only until their last reader
                scratch -= 4 * math.prod(values[v].shape)
                values[v] = None
    except K.ShapeError as e:
        raise InvalidArgument(f"op {step.ops[0]} ({kind_name(step.kind)}): {e}") from None
    result = {}
    for name, idx in plan.outputs:
        v = c.arg(idx)
        result[name] = np.ascontiguousarray(dev.to_host(v), dtype=np.float32 if v.dtype != np.int32 else np.int32)
    if shapes is not None and sig is not None:   # the first Compute of this signature: compile it
        while len(plan.programs) >= program.MAX_PROGRAMS:
            plan.programs.pop(next(iter(plan.programs)))
        plan.programs[sig] = program.build(plan, c.raw, c.weight, shapes, mode, limit)
    return result
