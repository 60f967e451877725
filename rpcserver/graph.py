"""Graphs: a registered ``pb.Graph`` checked once and kept as a plan, then executed per Compute.

Registration validates everything that does not depend on the step: tensor refs against their
buffers, op types, arity, argument order and attribute ranges, input declarations. Compute binds
the symbolic dimensions from the inputs it is given, runs the ops in order on the device's array
namespace, and returns the named outputs. Intermediate values live only inside one Compute.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import numpy as np
from gguf.quants import dequantize
from llamarpc.proto import pb
from llamarpc.proto.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from llamarpc.proto.types import ACTIVATION_DTYPES, PLAIN_DTYPES, GGMLType, parse_type

from . import kernels as K
from .memory import Memory
from .weights import WeightCache

log = logging.getLogger(__name__)

MAX_OPS = 1 << 16
MAX_INPUTS = 256
MAX_TENSORS = 1 << 16
MAX_SYMBOL_VALUE = 1 << 24
MAX_NAME = 128
# A Compute may hold this many times the node's capacity (at least MIN_SCRATCH) in intermediate
# values; an op whose output the shapes say would pass that is refused before anything is allocated.
SCRATCH_FACTOR = 2
MIN_SCRATCH = 256 << 20
# K.pool loops over the sequences, each pass over all rows: bound sequences x elements.
MAX_POOL_WORK = 1 << 30


@dataclasses.dataclass(frozen=True)
class InputSpec:
    name: str
    type: GGMLType
    shape: tuple[int | str, ...]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    buffer_id: int
    offset: int
    type: GGMLType
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class OpSpec:
    type: int
    args: tuple[int, ...]
    attrs: Any


@dataclasses.dataclass
class Plan:
    inputs: list[InputSpec]
    tensors: list[TensorSpec]
    ops: list[OpSpec]
    outputs: list[tuple[str, int]]
    buffers: frozenset[int]
    alive: bool = True
    # per op: the op-output values whose last reader it is (freed right after it runs)
    release: list[tuple[int, ...]] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        n_in, n_t = len(self.inputs), len(self.tensors)
        last: dict[int, int] = {}
        for j, op in enumerate(self.ops):
            for a in op.args:
                if a >= n_in + n_t:
                    last[a] = j
        kept = {v for _, v in self.outputs}
        rel: list[list[int]] = [[] for _ in self.ops]
        for v, j in last.items():
            if v not in kept:
                rel[j].append(v)
        self.release = [tuple(r) for r in rel]


def _name(s: str, what: str) -> str:
    if not s or len(s) > MAX_NAME or not s.isprintable():
        raise InvalidArgument(f"{what}: bad name {s[:MAX_NAME]!r}")
    return s


def _check_attrs(op: pb.Op, where: str) -> None:
    a = op.attrs
    finite = all(math.isfinite(x) for x in (a.eps, a.scale, a.freq_base, a.freq_scale, a.softcap))
    if not finite:
        raise InvalidArgument(f"{where}: attributes must be finite")
    t = op.type
    if t in (pb.RMS_NORM, pb.LAYER_NORM) and not (0 < a.eps < 1):
        raise InvalidArgument(f"{where}: eps must be in (0, 1), got {a.eps}")
    if t == pb.SOFTCAP and not a.scale > 0:
        raise InvalidArgument(f"{where}: softcap needs scale > 0")
    if t == pb.ROPE:
        if not (0 < a.head_dim <= 1024) or not (0 < a.n_dims <= a.head_dim) or a.n_dims % 2:
            raise InvalidArgument(f"{where}: rope needs 0 < n_dims <= head_dim <= 1024, n_dims even")
        if a.rope_mode not in (0, 2):
            raise InvalidArgument(f"{where}: rope_mode must be 0 (normal) or 2 (neox), got {a.rope_mode}")
        if not (a.freq_base > 0 and a.freq_scale > 0):
            raise InvalidArgument(f"{where}: rope freq_base and freq_scale must be positive")
    if t == pb.ATTENTION:
        if not (0 < a.head_dim <= 1024 and 0 < a.n_head_kv <= a.n_head <= 4096) or a.n_head % a.n_head_kv:
            raise InvalidArgument(f"{where}: attention needs head_dim in (0, 1024] and n_head a multiple of n_head_kv")
        if a.sliding_window < 0 or a.softcap < 0 or not a.scale > 0:
            raise InvalidArgument(f"{where}: attention needs scale > 0, sliding_window >= 0, softcap >= 0")
    if t == pb.POOL and a.pooling not in (1, 2, 3):
        raise InvalidArgument(f"{where}: pooling must be 1 (mean), 2 (cls) or 3 (last)")


def compile_graph(graph: pb.Graph, memory: Memory, session: str) -> Plan:
    if len(graph.inputs) > MAX_INPUTS or len(graph.tensors) > MAX_TENSORS or len(graph.ops) > MAX_OPS:
        raise InvalidArgument(
            f"graph too large: {len(graph.inputs)} inputs, {len(graph.tensors)} tensors, {len(graph.ops)} ops "
            f"(limits {MAX_INPUTS}, {MAX_TENSORS}, {MAX_OPS})")
    if not graph.ops or not graph.outputs:
        raise InvalidArgument("graph has no ops or no outputs")
    inputs: list[InputSpec] = []
    seen: set[str] = set()
    for i, gi in enumerate(graph.inputs):
        name = _name(gi.name, f"input {i}")
        if name in seen:
            raise InvalidArgument(f"input {name!r} is declared twice")
        seen.add(name)
        t = parse_type(gi.type, f"input {name!r}")
        if t not in ACTIVATION_DTYPES:
            raise InvalidArgument(f"input {name!r}: type must be F32 or I32, not {t.name}")
        if not 1 <= len(gi.shape) <= 4:
            raise InvalidArgument(f"input {name!r}: 1 to 4 dimensions")
        dims: list[int | str] = []
        for d in gi.shape:
            kind = d.WhichOneof("kind")
            if kind == "size":
                if not 0 <= d.size <= MAX_SYMBOL_VALUE:
                    raise InvalidArgument(f"input {name!r}: bad dimension {d.size}")
                dims.append(int(d.size))
            elif kind == "symbol":
                dims.append(_name(d.symbol, f"input {name!r} symbol"))
            else:
                raise InvalidArgument(f"input {name!r}: a dimension has neither size nor symbol")
        inputs.append(InputSpec(name, t, tuple(dims)))
    tensors: list[TensorSpec] = []
    for i, tr in enumerate(graph.tensors):
        t = parse_type(tr.type, f"tensor {i}")
        shape = tuple(int(d) for d in tr.shape)
        memory.view(session, tr.buffer_id, tr.offset, t, shape, f"tensor {i}")  # checks bounds
        tensors.append(TensorSpec(tr.buffer_id, tr.offset, t, shape))
    base = len(inputs) + len(tensors)
    ops: list[OpSpec] = []
    for j, op in enumerate(graph.ops):
        where = f"op {j}"
        arity = K.OP_ARITY.get(op.type)
        if arity is None:
            raise InvalidArgument(f"{where}: unknown op type {op.type}")
        if not arity[0] <= len(op.args) <= arity[1]:
            raise InvalidArgument(f"{where}: {pb.OpType.Name(op.type)} takes {arity[0]} arguments, got {len(op.args)}")
        for a in op.args:
            if a >= base + j:
                raise InvalidArgument(f"{where}: argument {a} does not name an earlier value")
        _check_attrs(op, where)
        if op.type == pb.ATTENTION:
            for a in op.args[3:5]:
                if not len(inputs) <= a < base:
                    raise InvalidArgument(f"{where}: the K/V caches must be tensors in a buffer")
                if tensors[a - len(inputs)].type not in (GGMLType.F32, GGMLType.F16):
                    raise InvalidArgument(f"{where}: the K/V caches must be F32 or F16")
        ops.append(OpSpec(op.type, tuple(op.args), op.attrs))
    outputs: list[tuple[str, int]] = []
    out_names: set[str] = set()
    for o in graph.outputs:
        name = _name(o.name, "output")
        if name in out_names or o.value >= base + len(ops):
            raise InvalidArgument(f"output {name!r}: duplicate or unknown value {o.value}")
        out_names.add(name)
        outputs.append((name, int(o.value)))
    return Plan(inputs, tensors, ops, outputs, frozenset(t.buffer_id for t in tensors))


def gather_rows(memory: Memory, session: str, ts: TensorSpec, ids: np.ndarray) -> Any:
    """Rows `ids` of a stored table, dequantizing only those rows."""
    _, raw = memory.view(session, ts.buffer_id, ts.offset, ts.type, ts.shape)
    if len(ts.shape) != 2:
        raise InvalidArgument(f"get_rows: the table must be 2-d, got {list(ts.shape)}")
    if ids.dtype.kind not in "iu":
        raise InvalidArgument(f"get_rows: ids must be I32, not {ids.dtype}")
    if ids.ndim != 1 or (ids.size and (int(ids.min()) < 0 or int(ids.max()) >= ts.shape[0])):
        raise InvalidArgument(f"get_rows: ids must be a 1-d array in [0, {ts.shape[0]})")
    dev = memory.device
    rows = dev.to_host(raw[dev.to_device(ids)])
    if ts.type in PLAIN_DTYPES:
        return dev.to_device(rows.astype(np.float32))
    return dev.to_device(dequantize(rows, ts.type).reshape(ids.shape[0], ts.shape[1]))


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


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _op_bytes(t: int, shapes: list[tuple[int, ...]], attrs: Any) -> tuple[int, int]:
    """(kept, transient) bytes an op is about to allocate, from its argument shapes alone: the
    output (which lives until the Compute ends) and the temporaries it makes on the way."""
    kept = max((_numel(s) for s in shapes), default=0)   # elementwise, norms, rope, pool, attention out
    transient = 2 * kept
    if t in (pb.ADD, pb.MUL):
        try:
            kept = _numel(np.broadcast_shapes(shapes[0], shapes[1]))
        except ValueError:
            pass   # the kernel reports the mismatch
    elif t == pb.MATMUL and shapes[0] and shapes[1]:
        kept = shapes[0][0] * shapes[1][0]
    elif t == pb.GET_ROWS and shapes[0] and shapes[1]:
        kept = shapes[1][0] * shapes[0][-1]
    elif t == pb.ATTENTION and shapes[0] and shapes[8]:
        transient = 3 * max(0, attrs.n_head) * shapes[0][0] * shapes[8][0]   # scores, exp, probs
    return 4 * kept, 4 * transient


def execute(plan: Plan, memory: Memory, weights: WeightCache, session: str,
            given: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not plan.alive:
        raise FailedPrecondition("the graph references a buffer that was freed; register it again")
    dev = memory.device
    xp = dev.xp
    host_inputs = bind_inputs(plan, given)
    n_in, n_t = len(plan.inputs), len(plan.tensors)
    values: list[Any] = [dev.to_device(a) for a in host_inputs] + [None] * (n_t + len(plan.ops))

    def tensor(idx: int, raw: bool = False) -> Any:
        ts = plan.tensors[idx - n_in]
        if raw:
            return memory.view(session, ts.buffer_id, ts.offset, ts.type, ts.shape)[1]
        if values[idx] is None:
            values[idx] = weights.get(session, ts)
        return values[idx]

    def arg(idx: int) -> Any:
        if n_in <= idx < n_in + n_t:
            return tensor(idx)
        return values[idx]

    def shape(idx: int) -> tuple[int, ...]:
        return plan.tensors[idx - n_in].shape if n_in <= idx < n_in + n_t else tuple(values[idx].shape)

    rope_memo: dict = {}   # cos/sin per (positions, rope params), shared by the layers of this Compute
    limit = max(SCRATCH_FACTOR * memory.capacity, MIN_SCRATCH)
    scratch = 0
    try:
        for j, op in enumerate(plan.ops):
            a, t, at = op.args, op.type, op.attrs
            kept, transient = _op_bytes(t, [shape(i) for i in a], at)
            if scratch + kept + transient > limit:
                raise ResourceExhausted(
                    f"op {j} ({pb.OpType.Name(t)}) would need {kept + transient} bytes on top of {scratch} "
                    f"already held by this Compute; the limit is {limit}")
            scratch += kept
            if t == pb.GET_ROWS and n_in <= a[0] < n_in + n_t:
                ids = arg(a[1])
                out = gather_rows(memory, session, plan.tensors[a[0] - n_in], dev.to_host(ids))
            elif t == pb.GET_ROWS:
                out = K.get_rows(xp, arg(a[0]), arg(a[1]))
            elif t == pb.RMS_NORM:
                out = K.rms_norm(xp, arg(a[0]), at.eps)
            elif t == pb.LAYER_NORM:
                out = K.layer_norm(xp, arg(a[0]), at.eps)
            elif t == pb.MATMUL:
                out = K.matmul(xp, arg(a[0]), arg(a[1]))
            elif t == pb.ADD:
                out = K.add(xp, arg(a[0]), arg(a[1]))
            elif t == pb.MUL:
                out = K.mul(xp, arg(a[0]), arg(a[1]))
            elif t == pb.SCALE:
                out = arg(a[0]) * at.scale
            elif t == pb.ROPE:
                out = K.rope(xp, arg(a[0]), arg(a[1]), at.head_dim, at.n_dims, at.rope_mode, at.freq_base, at.freq_scale,
                             memo=rope_memo)
            elif t == pb.ATTENTION:
                kc, vc = tensor(a[3], raw=True), tensor(a[4], raw=True)
                out = K.attention(xp, arg(a[0]), arg(a[1]), arg(a[2]), kc, vc, *(arg(i) for i in a[5:10]),
                                  n_head=at.n_head, n_head_kv=at.n_head_kv, head_dim=at.head_dim, scale=at.scale,
                                  sliding_window=at.sliding_window, softcap_=at.softcap)
            elif t == pb.SILU:
                out = K.silu(xp, arg(a[0]))
            elif t == pb.GELU:
                out = K.gelu(xp, arg(a[0]))
            elif t == pb.SWIGLU:
                out = K.swiglu(xp, arg(a[0]), arg(a[1]))
            elif t == pb.SOFTMAX:
                out = K.softmax(xp, arg(a[0]))
            elif t == pb.SOFTCAP:
                out = K.softcap(xp, arg(a[0]), at.scale)
            elif t == pb.POOL:
                seq = arg(a[1])
                n_seq = int(xp.max(seq)) + 1 if seq.shape[0] else 0
                if n_seq * max(1, _numel(shape(a[0]))) > MAX_POOL_WORK:
                    raise ResourceExhausted(f"pool: {n_seq} sequences over {list(shape(a[0]))} is too much work")
                out = K.pool(xp, arg(a[0]), seq, at.pooling, n_seq)
            else:  # compile_graph admits only known ops
                raise AssertionError(f"unhandled op {t}")
            values[n_in + n_t + j] = out
            for v in plan.release[j]:   # intermediates live only until their last reader
                scratch -= 4 * _numel(tuple(values[v].shape))
                values[v] = None
    except K.ShapeError as e:
        raise InvalidArgument(f"op {j} ({pb.OpType.Name(op.type)}): {e}") from None
    result = {}
    for name, idx in plan.outputs:
        v = arg(idx)
        result[name] = np.ascontiguousarray(dev.to_host(v), dtype=np.float32 if v.dtype != np.int32 else np.int32)
    return result
