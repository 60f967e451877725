"""Graphs: a registered ``pb.Graph`` checked once and kept as a plan (``executor.py`` runs it).

Registration validates everything that does not depend on the step: tensor refs against their
buffers, op types, arity, argument order and attribute ranges, input declarations.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

from llamarpc.proto import pb
from llamarpc.proto.errors import InvalidArgument
from llamarpc.proto.types import ACTIVATION_DTYPES, GGMLType, parse_type

from . import kernels as K
from .memory import Memory

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


@dataclasses.dataclass(frozen=True)
class Step:
    """One kernel call of a plan: a wire op, or (after `fuse`) several fused into one. It reads
    `args` and writes `outs` (value indices); `ops` are the plan ops it computes."""
    kind: int | str
    args: tuple[int, ...]
    outs: tuple[int, ...]
    attrs: Any
    ops: tuple[int, ...]

    @property
    def type(self) -> int | str:
        return self.kind


def kind_name(kind: int | str) -> str:
    """A step kind for messages: the wire op's name, or a fused step's."""
    return pb.OpType.Name(kind) if isinstance(kind, int) else kind


@dataclasses.dataclass
class Plan:
    inputs: list[InputSpec]
    tensors: list[TensorSpec]
    ops: list[OpSpec]
    outputs: list[tuple[str, int]]
    buffers: frozenset[int]
    alive: bool = True
    # what runs: one step per op until `fuse.fuse_plan` rewrites them
    steps: list[Step] = dataclasses.field(default_factory=list)
    # per step: the op-output values whose last reader it is (freed right after it runs)
    release: list[tuple[int, ...]] = dataclasses.field(default_factory=list)
    # value index -> the stored tensor's view into its buffer (made on first use; a buffer's
    # array lives as long as the buffer, and a freed buffer marks the plan dead)
    views: dict[int, Any] = dataclasses.field(default_factory=dict)
    weights: dict[int, Any] = dataclasses.field(default_factory=dict)   # value index -> quant.QWeight
    # signature -> its program.Program (None: none pays for it); see program.py
    programs: dict[tuple, Any] = dataclasses.field(default_factory=dict)
    # inputs read only as an attention's visible cells (kv_pos, kv_seq): their length may change
    # from Compute to Compute without changing any other shape
    dynamic: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        base = len(self.inputs) + len(self.tensors)
        if not self.steps:
            self.steps = [Step(op.type, op.args, (base + j,), op.attrs, (j,)) for j, op in enumerate(self.ops)]
        self.set_steps(self.steps)

    def set_steps(self, steps: list[Step]) -> None:
        base = len(self.inputs) + len(self.tensors)
        last: dict[int, int] = {}
        for j, st in enumerate(steps):
            for a in st.args:
                if a >= base:
                    last[a] = j
        kept = {v for _, v in self.outputs}
        rel: list[list[int]] = [[] for _ in steps]
        for v, j in last.items():
            if v not in kept:
                rel[j].append(v)
        self.steps = steps
        self.release = [tuple(r) for r in rel]
        self.programs = {}
        readers: dict[int, list[tuple[Step, int]]] = {}
        for st in steps:
            for pos, a in enumerate(st.args):
                readers.setdefault(a, []).append((st, pos))
        self.dynamic = frozenset(
            i for i in range(len(self.inputs))
            if readers.get(i) and all(st.kind == pb.ATTENTION and pos in (8, 9) for st, pos in readers[i]))


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
    if t == pb.RMS_NORM and not 0 <= a.head_dim <= 1 << 20:
        raise InvalidArgument(f"{where}: rms_norm head_dim must be in [0, 2^20], got {a.head_dim}")
    if t == pb.SOFTCAP and not a.scale > 0:
        raise InvalidArgument(f"{where}: softcap needs scale > 0")
    if t in (pb.ROPE, pb.ROPE_SHIFT):
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
        if a.non_causal and a.sliding_window:
            raise InvalidArgument(f"{where}: non_causal attention cannot have a sliding window")
    elif a.non_causal:
        raise InvalidArgument(f"{where}: non_causal is an attention attribute")
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
        if op.type == pb.ROPE_SHIFT:
            c = op.args[0]
            if not len(inputs) <= c < base:
                raise InvalidArgument(f"{where}: rope_shift's K cache must be a tensor in a buffer")
            ts = tensors[c - len(inputs)]
            if ts.type not in (GGMLType.F32, GGMLType.F16) or len(ts.shape) != 2 or ts.shape[1] % op.attrs.head_dim:
                raise InvalidArgument(f"{where}: rope_shift's K cache must be a 2-d F32 or F16 tensor of whole heads")
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
