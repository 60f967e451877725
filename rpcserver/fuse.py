"""Fusing a plan at RegisterGraph: patterns of the generic graph that the CPU runs as one call.

The wire protocol keeps the generic op set; a node rewrites the steps of a registered plan:
- RMS_NORM(x) -> MUL(., w) with w a stored 1-d F32 tensor and the norm read by nothing else:
  one `rms_norm_mul` step (one pass over x);
- every MATMUL of the same activation value by stored 2-d weights (q/k/v, gate/up): one
  `matmuls` step, so the activation is prepared once (quantized once in fast mode).
A fused plan computes what the unfused one does (tests/test_fuse.py compares them on the real
model); a shape the fused kernel does not expect falls back to the generic ops at run time.
"""
from __future__ import annotations

import collections
from typing import Any

from llamarpc.proto import pb
from llamarpc.proto.types import GGMLType

from . import kernels as K
from . import quant
from .executor import FUSED_BYTES, KERNELS, Ctx, _matmul_weight, _op_bytes
from .graph import Plan, Step
from .quant import ops as cpu_ops


def fuse_plan(plan: Plan) -> int:
    """Rewrite the plan's steps in place; returns how many ops were folded away."""
    n_in, n_t = len(plan.inputs), len(plan.tensors)
    base = n_in + n_t
    ops = plan.ops
    readers: dict[int, list[int]] = collections.defaultdict(list)
    for j, op in enumerate(ops):
        for a in op.args:
            readers[a].append(j)
    outputs = {v for _, v in plan.outputs}

    def stored(i: int) -> bool:
        return n_in <= i < base

    def norm_weight(i: int) -> bool:
        ts = plan.tensors[i - n_in] if stored(i) else None
        return ts is not None and ts.type == GGMLType.F32 and len(ts.shape) == 1

    def weight_matrix(i: int) -> bool:
        return stored(i) and len(plan.tensors[i - n_in].shape) == 2

    groups: dict[int, list[int]] = collections.defaultdict(list)   # activation -> its matmuls
    for j, op in enumerate(ops):
        if op.type == pb.MATMUL and weight_matrix(op.args[1]):
            groups[op.args[0]].append(j)
    done: set[int] = set()
    steps: list[Step] = []
    for j, op in enumerate(ops):
        if j in done:
            continue
        out = base + j
        if (op.type == pb.RMS_NORM and len(op.args) == 1 and op.attrs.head_dim == 0 and out not in outputs
                and len(readers[out]) == 1):
            k = readers[out][0]
            m = ops[k]
            if m.type == pb.MUL and m.args[0] == out and norm_weight(m.args[1]) and m.args[1] != out:
                steps.append(Step("rms_norm_mul", (op.args[0], m.args[1]), (base + k,), op.attrs, (j, k)))
                done.update((j, k))
                continue
        if op.type == pb.MATMUL and len(groups.get(op.args[0], ())) > 1 and groups[op.args[0]][0] == j:
            group = groups[op.args[0]]
            steps.append(Step("matmuls", (op.args[0], *(ops[g].args[1] for g in group)),
                              tuple(base + g for g in group), None, tuple(group)))
            done.update(group)
            continue
        steps.append(Step(op.type, op.args, (out,), op.attrs, (j,)))
    plan.set_steps(steps)
    return len(ops) - len(steps)


# -- the fused kernels ----------------------------------------------------------------------------

def _rms_norm_mul(c: Ctx, step: Step) -> Any:
    x, w = c.arg(step.args[0]), c.arg(step.args[1])
    if c.dev.is_cpu and x.ndim == 2 and w.shape == (x.shape[1],):
        return cpu_ops.rms_norm(x, step.attrs.eps, w)
    return K.mul(c.xp, K.rms_norm(c.xp, x, step.attrs.eps), w)


def _matmuls(c: Ctx, step: Step) -> tuple[Any, ...]:
    x = c.arg(step.args[0])
    ws = step.args[1:]
    specs = [c.spec(w) for w in ws]
    if (c.dev.is_cpu and x.ndim == 2 and len({(t.type, t.shape[1]) for t in specs}) == 1
            and specs[0].type in quant.TYPES and x.shape[1] == specs[0].shape[1]):
        return tuple(quant.matmul_many(x, [c.weight(w) for w in ws], c.mode))
    return tuple(_matmul_weight(c, x, w) for w in ws)


def _rms_norm_mul_bytes(c: Ctx, step: Step) -> tuple[int, int]:
    return _op_bytes(pb.RMS_NORM, [c.shape(step.args[0])], step.attrs)


def _matmuls_bytes(c: Ctx, step: Step) -> tuple[int, int]:
    kept = transient = 0
    for w in step.args[1:]:
        k, t = _op_bytes(pb.MATMUL, [c.shape(step.args[0]), c.shape(w)], None)
        kept, transient = kept + k, max(transient, t)
    return kept, transient


KERNELS["rms_norm_mul"] = _rms_norm_mul
KERNELS["matmuls"] = _matmuls
FUSED_BYTES["rms_norm_mul"] = _rms_norm_mul_bytes
FUSED_BYTES["matmuls"] = _matmuls_bytes
