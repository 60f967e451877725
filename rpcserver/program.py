"""Programs: a plan's steps, for one signature of input shapes, run as a few compiled calls.

A decode step of a 30-layer model is ~400 kernel calls. Run one by one from Python (bind the
arguments, allocate the output, find the addresses, call through ctypes) each costs 5-25 us,
together more than the kernels' own time. The first Compute of a signature (the input shapes; the
length of the visible cache cells excepted) runs step by step and records every value's shape.
From those, `build` lays every intermediate out in one arena, reusing a region once its value is
dead, and turns each step into a record for ``quant/program.c``: the same compiled kernel the
step-by-step path calls, with every address and size resolved. Steps with no record (an F32
weight, an elementwise op with no compiled twin, a shape off the fast path) stay Python calls
between runs of records, writing into the arena. Later Computes of the signature copy the inputs
into the arena, run, and copy the outputs out: bit for bit what the step-by-step path computes
(tests/test_program.py compares them on every architecture).

Only small batches are compiled (every matmul of at most GEMV_MAX_ROWS rows: decode); a prefill's
kernels dwarf its dispatch. Values read at run time are checked there (token ids against the
table, cache cells by the attention kernel); everything else was checked when the record was made.
"""
from __future__ import annotations

import ctypes
import math
import os
import struct
import threading
from typing import Any

import numpy as np
from llamarpc.proto import pb
from llamarpc.proto.errors import InvalidArgument
from llamarpc.proto.types import GGMLType

from . import quant
from .graph import Plan, Step, kind_name
from .quant import native
from .quant import ops as cpu_ops

(PR_GEMV, PR_GEMV_MULTI, PR_QUANT, PR_GEMV_FAST, PR_ATTENTION, PR_ROPE, PR_RMS, PR_ADD, PR_MUL, PR_GATHER,
 PR_SWIGLU) = range(1, 12)
ENABLED = os.environ.get("LLAMARPC_PROGRAMS", "1") != "0"   # 0: every Compute step by step (debugging)
MAX_ARENA = 64 << 20    # bytes of intermediates a program may keep between Computes
MAX_PROGRAMS = 4        # signatures kept per plan (the oldest goes first)
ALIGN = 64

_F32, _I32 = np.dtype(np.float32), np.dtype(np.int32)


def _f64_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _fn(lib: Any, name: str) -> int:
    return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value


def signature(plan: Plan, inputs: list[np.ndarray], mode: str) -> tuple:
    dyn = plan.dynamic
    return (mode, *(None if i in dyn else a.shape for i, a in enumerate(inputs)))


class _Regions:
    """First-fit offsets in a growing arena; a freed region is reused by a later value."""

    def __init__(self) -> None:
        self.free: list[tuple[int, int]] = []
        self.top = 0

    def alloc(self, nbytes: int) -> int:
        n = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        for j, (off, size) in enumerate(self.free):
            if size >= n:
                if size == n:
                    del self.free[j]
                else:
                    self.free[j] = (off + n, size - n)
                return off
        off, self.top = self.top, self.top + n
        return off

    def release(self, off: int, nbytes: int) -> None:
        self.free.append((off, max(ALIGN, -(-nbytes // ALIGN) * ALIGN)))


class Program:
    """One signature's compiled run: segments of records (int64 arrays) and Python steps."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.segments: list[Any] = []        # np.int64 record array, or a Step run in Python
        self.seg_steps: list[list[Step]] = []   # per record segment: the step of each record
        self.views: list[Any] = []            # value index -> its arena view (None: stored)
        self.patches: list[tuple[np.ndarray, int, int]] = []   # (records, field, input): a length
        self.caps: dict[int, int] = {}        # dynamic input -> the cells its slot holds
        self.keep: list[Any] = []             # what the records point into
        self.attn_work = 0                    # n_head * N summed over the attentions
        self.arena_bytes = 0
        self.runs = 0                         # Computes this program ran

    def run(self, plan: Plan, kernels: dict, ctx_factory: Any, inputs: list[np.ndarray],
            limit: int) -> dict[str, np.ndarray] | None:
        """The outputs, or None when this Compute is off the program (then run it step by step).
        Python steps run through `kernels` (the executor's op -> kernel table) on `ctx_factory`'s
        context."""
        lib = native.load()
        for i, a in enumerate(inputs):
            cap = self.caps.get(i)
            if cap is not None:
                n = a.shape[0]
                if n > cap or n == 0:
                    return None
                self.views[i][:n] = a
            else:
                np.copyto(self.views[i], a)
        for recs, field, i in self.patches:
            recs[field] = inputs[i].shape[0]
        if any(inputs[i].shape[0] != inputs[j].shape[0] for i in self.caps for j in self.caps):
            return None
        if self.caps and self.arena_bytes + 12 * self.attn_work * inputs[next(iter(self.caps))].shape[0] > limit:
            return None   # the step-by-step path reports it
        c = None
        seg_no = 0
        for seg in self.segments:
            if isinstance(seg, np.ndarray):
                rc = lib.run_program(seg.ctypes.data, seg.shape[0])
                if rc:
                    self._fail(rc, self.seg_steps[seg_no], plan)
                seg_no += 1
                continue
            if c is None:   # a Python step sees the dynamic inputs at this Compute's length, not the slot's
                vals = list(self.views)
                for i in self.caps:
                    vals[i] = self.views[i][:inputs[i].shape[0]]
                c = ctx_factory(vals)
            out = kernels[seg.kind](c, seg)
            outs = (out,) if len(seg.outs) == 1 else out
            for v, o in zip(seg.outs, outs):
                view = self.views[v]
                if o.shape != view.shape:
                    raise RuntimeError(f"program: step {seg.ops[0]} gave {o.shape}, recorded {view.shape}")
                np.copyto(view, o)
        result = {}
        for name, idx in plan.outputs:
            view = self.views[idx] if idx < len(self.views) else None
            if view is None:
                if c is None:
                    c = ctx_factory(list(self.views))
                view = c.arg(idx)
            result[name] = np.array(view, dtype=np.float32 if view.dtype != np.int32 else np.int32)
        self.runs += 1
        return result

    @staticmethod
    def _fail(rc: int, steps: list[Step], plan: Plan) -> None:
        idx, code = rc // 16 - 1, rc % 16
        step = steps[idx] if 0 <= idx < len(steps) else steps[-1]
        if code == 1:
            rows = plan.tensors[step.args[0] - len(plan.inputs)].shape[0]
            raise InvalidArgument(f"get_rows: ids must be a 1-d array in [0, {rows})")
        if code == 2:
            m = plan.tensors[step.args[3] - len(plan.inputs)].shape[0]
            raise InvalidArgument(f"op {step.ops[0]} ({kind_name(step.kind)}): attention: cells must be in [0, {m})")
        if code == 3:
            raise MemoryError("attention: no memory for the scratch scores")
        raise RuntimeError(f"program: bad record for step {step.ops[0]}")


def build(plan: Plan, raw: Any, weight: Any, shapes: dict[int, tuple[tuple[int, ...], np.dtype]],
          mode: str, limit: int) -> Program | None:
    """The program for the signature whose value shapes are `shapes`, or None when it would not
    pay or cannot be made (a batch too big, no compiled kernels, an arena over the limits)."""
    lib = native.load()
    if lib is None or mode not in ("exact", "fast") or not hasattr(lib, "run_program"):
        return None
    n_in, n_t = len(plan.inputs), len(plan.tensors)
    n_values = n_in + n_t + len(plan.ops)
    dyn = plan.dynamic

    def stored(i: int) -> bool:
        return n_in <= i < n_in + n_t

    def spec(i: int) -> Any:
        return plan.tensors[i - n_in]

    for st in plan.steps:   # decode-sized batches only
        if st.kind in (pb.MATMUL, "matmuls") and not stored(st.args[0]):
            sh = shapes.get(st.args[0])
            if sh is None or len(sh[0]) != 2 or sh[0][0] > quant.GEMV_MAX_ROWS:
                return None

    # the cache rows each dynamic input's slot must hold
    caps: dict[int, int] = {}
    for st in plan.steps:
        if st.kind == pb.ATTENTION:
            if not stored(st.args[3]):
                return None
            for a in st.args[8:10]:
                if a in dyn:
                    caps[a] = max(caps.get(a, 0), spec(st.args[3]).shape[0])

    # pass 1: regions
    regions = _Regions()
    where: dict[int, tuple[int, tuple[int, ...], np.dtype]] = {}

    def place(v: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        where[v] = (regions.alloc(max(1, math.prod(shape)) * dtype.itemsize), shape, dtype)

    for i in range(len(plan.inputs)):
        if i in caps:
            place(i, (caps[i],), _I32)
        elif i in shapes:
            place(i, *shapes[i])
        else:
            return None
    scratch: dict[int, tuple[int, int, int]] = {}   # step -> fast-mode activation scratch offsets
    for j, (st, rel) in enumerate(zip(plan.steps, plan.release)):
        for v in st.outs:
            if v not in shapes:
                return None
            place(v, *shapes[v])
        if mode == "fast" and st.kind in (pb.MATMUL, "matmuls") and st.args[0] in shapes:
            n, k = shapes[st.args[0]][0]
            if k % 32 == 0:
                sizes = (n * k, 4 * n * (k // 32), 4 * n * (k // 16))
                offs = tuple(regions.alloc(s) for s in sizes)
                scratch[j] = offs
                for o, s in zip(offs, sizes):
                    regions.release(o, s)
        for v in rel:
            if v in where and v >= n_in:
                off, shape, dtype = where[v]
                regions.release(off, max(1, math.prod(shape)) * dtype.itemsize)
    if regions.top > min(MAX_ARENA, limit):
        return None

    # pass 2: the arena, its views, the records
    p = Program()
    buf = np.empty(regions.top + ALIGN, np.uint8)
    base = (-buf.ctypes.data) % ALIGN
    arena = buf[base:base + regions.top]
    p.keep.append(buf)
    p.arena_bytes = regions.top
    p.views = [None] * n_values
    for v, (off, shape, dtype) in where.items():
        p.views[v] = arena[off:off + max(1, math.prod(shape)) * dtype.itemsize].view(dtype)[:math.prod(shape)].reshape(shape)
    p.caps = caps
    arena_addr = arena.ctypes.data

    def addr(i: int) -> int:
        return raw(i).ctypes.data if stored(i) else p.views[i].ctypes.data

    def shape(i: int) -> tuple[int, ...]:
        return spec(i).shape if stored(i) else p.views[i].shape

    def f32(i: int) -> bool:
        return spec(i).type == GGMLType.F32 if stored(i) else p.views[i].dtype == _F32

    def i32(i: int) -> bool:
        return not stored(i) and p.views[i].dtype == _I32

    def qweight(i: int, k: int) -> Any:
        """The stored matrix as a QWeight when a compiled kernel reads it, else None."""
        if not stored(i) or len(spec(i).shape) != 2 or spec(i).shape[1] != k:
            return None
        qt = quant.TYPES.get(spec(i).type)
        return weight(i) if qt is not None and qt.kernel else None

    def matmul_recs(j: int, x: int, ws: list[int], outs: tuple[int, ...]) -> list[list[int]] | None:
        xs = shape(x)
        if stored(x) or not f32(x) or len(xs) != 2 or xs[0] == 0:
            return None
        n, k = xs
        qws = [qweight(w, k) for w in ws]
        if any(q is None for q in qws):
            return None
        qts = [quant.TYPES[q.qtype] for q in qws]
        recs: list[list[int]] = []
        if (mode == "exact" and len(qws) > 1 and qts[0].has_fast
                and all(q.qtype == qws[0].qtype and q.k == k for q in qws)):   # as quant.matmul_many
            tables = np.array([q.address for q in qws] + [q.m for q in qws] + [addr(o) for o in outs], np.int64)
            p.keep.append(tables)
            t = tables.ctypes.data
            nw = len(qws)
            recs.append([PR_GEMV_MULTI, _fn(lib, f"{qts[0].kernel}_gemv_exact_multi"), nw, t, t + 8 * nw,
                         qws[0].blocks.shape[1], k, addr(x), n, t + 16 * nw])
            return recs
        for q, qt, o in zip(qws, qts, outs):
            if mode == "fast" and qt.has_fast:
                if j not in scratch:
                    return None
                xq, xd, xsum = (arena_addr + off for off in scratch[j])
                recs.append([PR_QUANT, addr(x), n, k, xq, xd, xsum])
                recs.append([PR_GEMV_FAST, _fn(lib, f"{qt.kernel}_gemv_fast"), q.address, q.blocks.shape[1], k, q.m,
                             xq, xd, xsum, n, addr(o)])
            else:
                recs.append([PR_GEMV, _fn(lib, f"{qt.kernel}_gemv_exact"), q.address, q.blocks.shape[1], k, q.m,
                             addr(x), n, addr(o)])
        return recs

    def period(i: int, out_shape: tuple[int, ...]) -> int | None:
        s = tuple(shape(i))
        while s and s[0] == 1:
            s = s[1:]
        return math.prod(s) if s == tuple(out_shape[len(out_shape) - len(s):]) else None

    def record(j: int, st: Step) -> list[list[int]] | None:
        a, at = st.args, st.attrs
        if st.kind == "matmuls":
            return matmul_recs(j, a[0], list(a[1:]), st.outs)
        if st.kind == pb.MATMUL:
            return matmul_recs(j, a[0], [a[1]], st.outs)
        out = st.outs[0]
        if st.kind in ("rms_norm_mul", pb.RMS_NORM):
            x = a[0]
            xs = shape(x)
            kk = (at.head_dim or xs[-1]) if xs else 0    # head_dim > 0: per head (QK-norm)
            if stored(x) or not f32(x) or not xs or kk <= 0 or xs[-1] % kk or math.prod(xs) == 0:
                return None
            w = 0
            if st.kind == "rms_norm_mul" or len(a) > 1:
                if len(xs) != 2 or not stored(a[1]) or not f32(a[1]) or shape(a[1]) != (kk,):
                    return None
                w = addr(a[1])
            return [[PR_RMS, addr(x), math.prod(xs) // kk, kk, w, _f64_bits(at.eps), addr(out)]]
        if st.kind == pb.ROPE:
            x, pos = a[0], a[1]
            xs = shape(x)
            if (stored(x) or not f32(x) or len(xs) != 2 or not i32(pos) or shape(pos) != (xs[0],) or at.head_dim <= 0
                    or xs[1] % at.head_dim or at.n_dims < 0 or at.n_dims > min(at.head_dim, 8192) or at.n_dims % 2):
                return None
            freqs = cpu_ops._freqs(at.n_dims, at.freq_base, at.freq_scale)
            p.keep.append(cpu_ops._inv_freq[(at.n_dims, at.freq_base, at.freq_scale)][0])
            return [[PR_ROPE, addr(x), addr(out), addr(pos), xs[0], xs[1], at.head_dim, at.n_dims, at.rope_mode, freqs]]
        if st.kind == pb.ATTENTION:
            q, k, v, kc, vc, cells, tpos, tseq, kvp, kvs = a[:10]
            n = shape(q)[0] if len(shape(q)) == 2 else -1
            kvw = at.n_head_kv * at.head_dim
            if (n <= 0 or at.n_head_kv <= 0 or at.head_dim <= 0 or at.n_head % at.n_head_kv
                    or any(stored(i) or not f32(i) for i in (q, k, v))
                    or shape(q) != (n, at.n_head * at.head_dim) or shape(k) != (n, kvw) or shape(v) != (n, kvw)
                    or not all(i32(i) and shape(i) == (n,) for i in (cells, tpos, tseq))
                    or kvp not in caps or kvs not in caps or len(shape(kc)) != 2 or shape(kc)[1] != kvw
                    or shape(vc) != shape(kc)):
                return None
            kl, vl = cpu_ops._cache_layout(raw(kc)), cpu_ops._cache_layout(raw(vc))
            if kl is None or vl is None:
                return None
            tpos_addr = addr(tpos)
            if at.non_causal:   # as cpu_ops.attention (no window then: graph.py): INT32_MAX sees all its sequence
                far = np.full(n, np.iinfo(np.int32).max, np.int32)
                p.keep.append(far)
                tpos_addr = far.ctypes.data
            rec = [PR_ATTENTION, addr(q), addr(k), addr(v), addr(kc), addr(vc), kl[1], vl[1], int(kl[0]), int(vl[0]),
                   shape(kc)[0], addr(cells), tpos_addr, addr(tseq), n, addr(kvp), addr(kvs), 0, at.n_head,
                   at.n_head_kv, at.head_dim, _f64_bits(at.scale), at.sliding_window,
                   _f64_bits(at.softcap if at.softcap > 0 else 0.0), addr(out)]
            p.attn_work += at.n_head * n
            return [rec]   # field 16 (L) is patched per Compute: see below
        if st.kind in (pb.ADD, pb.MUL):
            os_ = shape(out)
            if not all(f32(i) for i in a[:2]) or p.views[out].dtype != _F32:
                return None
            pa, pb_ = period(a[0], os_), period(a[1], os_)
            n = math.prod(os_)
            if pa is None or pb_ is None or not (pa == n or pb_ == n) or min(pa, pb_) == 0:
                return None
            return [[PR_ADD if st.kind == pb.ADD else PR_MUL, addr(a[0]), pa, addr(a[1]), pb_, n, addr(out)]]
        if st.kind == pb.SWIGLU:
            g, u = a
            if stored(g) or stored(u) or not (f32(g) and f32(u)) or shape(g) != shape(u):
                return None
            return [[PR_SWIGLU, addr(g), addr(u), math.prod(shape(g)), addr(out)]]
        if st.kind == pb.GET_ROWS:
            tbl, ids = a
            if not stored(tbl) or len(spec(tbl).shape) != 2 or not i32(ids) or len(shape(ids)) != 1:
                return None
            qt = quant.TYPES.get(spec(tbl).type)
            if qt is None or not qt.kernel:
                return None
            w = weight(tbl)
            return [[PR_GATHER, _fn(lib, f"{qt.kernel}_gather_rows"), w.address, w.blocks.shape[1], w.k, w.m,
                     addr(ids), shape(ids)[0], addr(out)]]
        return None

    cur: list[int] = []
    cur_steps: list[Step] = []
    cur_patch: list[tuple[int, int]] = []   # (field offset in cur, input)

    def flush() -> None:
        if cur:
            recs = np.array(cur, np.int64)
            p.segments.append(recs)
            p.seg_steps.append(list(cur_steps))
            for field, i in cur_patch:
                p.patches.append((recs, field, i))
            cur.clear()
            cur_steps.clear()
            cur_patch.clear()

    for j, st in enumerate(plan.steps):
        recs = record(j, st)
        if recs is None:
            flush()
            p.segments.append(st)
            continue
        for r in recs:
            if r[0] == PR_ATTENTION:
                cur_patch.append((len(cur) + 2 + 16, st.args[8]))
            cur.extend([r[0], len(r) - 1, *r[1:]])
            cur_steps.append(st)   # one per record: run_program reports the record that failed
    flush()
    if not any(isinstance(s, np.ndarray) for s in p.segments):
        return None
    return p
