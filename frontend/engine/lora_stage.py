"""LoRA adapters on the pipeline's stages: each stage gets the A/B tensors of the base tensors it
holds (one buffer of their own, so the base weights' buffer and its in-place mapping are as
without adapters), a graph built by `LoraGraphBuilder`, and per step the scale inputs its graph
declares, cut to the step's micro-batch rows (and, for the output head, its wanted rows)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from llamarpc.client import Backend, GraphBuilder, TensorRef

from ..model.lora import LoraAdapter, LoraGraphBuilder, LoraTerm, ScaleInput


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def adapter_bytes(adapters: Sequence[LoraAdapter], names: Sequence[str], align: int = 32) -> int:
    """Node memory the adapters' A/B of these base tensors take."""
    want = set(names)
    return sum(_align(t.nbytes, align) for ad in adapters for base, p in ad.pairs.items() if base in want
               for t in (p.a, p.b))


class StageLora:
    """The adapters' tensors on one stage and the scale inputs of its graph."""

    def __init__(self) -> None:
        self.buffer = 0
        self.nbytes = 0
        self.inputs: list[ScaleInput] = []

    def upload(self, backend: Backend, adapters: Sequence[LoraAdapter], refs: Mapping[str, TensorRef],
               align: int) -> tuple[GraphBuilder, int]:
        """Send the A/B of the stage's adapted tensors (from the node's cache when it has them);
        returns the graph builder to build the stage's graph with and the bytes sent. Without
        adapters on this stage, the plain GraphBuilder and nothing sent."""
        items = [(ad, p) for ad in adapters for base, p in ad.pairs.items() if base in refs]
        self.buffer, self.nbytes, self.inputs = 0, 0, []
        if not items:
            return GraphBuilder(), 0
        offsets: list[tuple[int, int]] = []
        size = 0
        for _, p in items:
            oa = size
            size = _align(size + p.a.nbytes, align)
            offsets.append((oa, size))
            size = _align(size + p.b.nbytes, align)
        self.nbytes = size
        self.buffer = backend.alloc_buffer(size)
        tensors, digests = [], []
        for (ad, p), (oa, ob) in zip(items, offsets):
            tensors += [(self.buffer, oa, p.a.data), (self.buffer, ob, p.b.data)]
            digests += [ad.gguf.digest(p.a.name), ad.gguf.digest(p.b.name)]
        sent = backend.set_tensors(tensors, cache=True, digests=digests)
        terms: dict[TensorRef, list[LoraTerm]] = {}
        for (ad, p), (oa, ob) in zip(items, offsets):
            a = TensorRef(self.buffer, oa, p.a.type, p.a.shape)
            b = TensorRef(self.buffer, ob, p.b.type, p.b.shape)
            terms.setdefault(refs[p.base], []).append(
                LoraTerm(ad.id, a, b, ad.factor(p.base), head=p.base == "output.weight"))
        return LoraGraphBuilder(terms), sent

    def check_built(self, gb: GraphBuilder, names: Mapping[TensorRef, str]) -> None:
        """After the graph is built: every adapted tensor was multiplied by (else a clear error)."""
        if not isinstance(gb, LoraGraphBuilder):
            return
        unused = [names.get(r, str(r)) for r in gb.unused]
        if unused:
            raise ValueError(f"LoRA of {', '.join(sorted(unused))}: this architecture's graph does not multiply "
                             "by that tensor as a whole (a fused or sliced weight); not supported")
        self.inputs = gb.scale_inputs

    def step_inputs(self, scales: np.ndarray, rows: slice, out_rows: np.ndarray) -> dict[str, np.ndarray]:
        """This stage's scale inputs for the micro-batch `rows` of a step whose per-row scales are
        `scales` F32[n, n_adapters]; `out_rows` the wanted rows within the micro-batch."""
        out: dict[str, np.ndarray] = {}
        for s in self.inputs:
            col = scales[rows, s.adapter] * np.float32(s.factor)
            if s.head:
                col = col[out_rows]
            out[s.name] = np.ascontiguousarray(np.broadcast_to(col[:, None], (col.size, s.rank)), np.float32)
        return out


def row_scales(adapters: Sequence[LoraAdapter], n: int, per_row: np.ndarray | None) -> np.ndarray:
    """F32[n, n_adapters]: the given per-row scales, or every row at the adapters' global scales."""
    if per_row is not None:
        return np.asarray(per_row, np.float32).reshape(n, len(adapters))
    return np.tile(np.array([a.scale for a in adapters], np.float32), (n, 1))


__all__ = ["StageLora", "adapter_bytes", "row_scales"]
