"""Context shift (--context-shift), as llama-server does it: when a generating slot's sequence
fills its context, keep the first n_keep tokens, drop the next n_discard (default: half of the
rest) and move the remaining KV cells back by n_discard positions, then go on.

The cached K were turned by RoPE at their old positions; each node turns them by -n_discard in
place (the ROPE_SHIFT op, one per layer, in a small graph per stage registered on first use), so
nothing is recomputed. A node without the op (an older node) or a shift that fails gets the
fallback: the moved tokens are fed again at their new positions (a prefill of the rest).

As in llama.cpp, the kept K/V of layers above the first still carry what the dropped tokens
contributed to them; the first layer's are exactly those of the kept tokens at their new positions.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
from llamarpc.client import GraphBuilder
from llamarpc.proto import pb
from llamarpc.proto.errors import BackendError
from llamarpc.proto.types import GGMLType

if TYPE_CHECKING:
    from .kv_cells import KVCells
    from .pipeline import Pipeline, Stage
    from .slot import Slot

log = logging.getLogger(__name__)


def shift_graph(pipeline: Pipeline, stage: Stage) -> pb.Graph:
    """ROPE_SHIFT of every layer's K cache of the stage, by the same cells and deltas."""
    gb = GraphBuilder()
    cells = gb.input("cells", GGMLType.I32, ("n",))
    delta = gb.input("delta", GGMLType.I32, ("n",))
    out = cells
    for i in stage.layers:
        r = pipeline.arch.rope_attrs(pipeline.args, i)
        # each op takes the cells from the one before: a chain, so every layer's op runs
        out = gb.op(pb.ROPE_SHIFT, gb.tensor(stage.kv_refs[i][0]), out, delta, head_dim=r["head_dim"],
                    n_dims=r["n_dims"], rope_mode=r["mode"], freq_base=r["freq_base"], freq_scale=r["freq_scale"])
    gb.output("cells", out)
    return gb.build()


class KVShifter:
    """Turns cached K on the nodes of a pipeline (graphs registered once per stage and epoch)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self._graphs: dict[tuple[int, int, int], int] = {}

    def supported(self) -> bool:
        return all(pb.ROPE_SHIFT in s.backend.hello().ops for s in self.pipeline.stages)

    def shift(self, cells: np.ndarray, delta: np.ndarray) -> None:
        """K[c] = rope(K[c], delta) for the cells, on every layer. Raises BackendError."""
        inputs = {"cells": np.ascontiguousarray(cells, np.int32), "delta": np.ascontiguousarray(delta, np.int32)}
        if inputs["cells"].size == 0:
            return
        p = self.pipeline
        for s in p.stages:
            key = (id(s), p.epoch, s.graph_id)
            gid = self._graphs.get(key)
            if gid is None:
                gid = self._graphs[key] = s.backend.register_graph(shift_graph(p, s))
            s.backend.compute(gid, inputs)


def n_keep_discard(slot: Slot, add_bos: bool) -> tuple[int, int]:
    """llama-server's rule: n_keep (-1: the whole prompt; +1 for BOS) at most n_ctx - 4; n_discard
    from the request, else half of what follows n_keep."""
    task = slot.task
    assert task is not None
    p = task.params
    n_keep = len(task.prompt) if p.n_keep < 0 else p.n_keep
    n_keep = min(slot.n_ctx - 4, n_keep + (1 if add_bos else 0))
    n_left = len(slot.cache) - n_keep
    n_discard = p.n_discard if p.n_discard else n_left // 2
    return n_keep, max(1, min(n_discard, n_left))


def shift_slot(kv: KVCells, slot: Slot, shifter: KVShifter, add_bos: bool) -> None:
    """Make room in the slot's sequence for its next token (on the engine thread)."""
    sid = slot.id
    n_past = len(slot.cache)
    n_keep, n_discard = n_keep_discard(slot, add_bos)
    kv.remove(sid, n_keep, n_keep + n_discard)
    moved = np.flatnonzero((kv.seq == sid) & (kv.pos >= n_keep + n_discard)).astype(np.int32)
    done = False
    if shifter.supported():
        try:
            shifter.shift(moved, np.full(moved.size, -n_discard, np.int32))
            done = True
        except BackendError as e:
            log.warning("slot %d: context shift on the nodes failed (%s); recomputing the kept tokens", sid, e)
    tail = slot.cache[n_keep + n_discard:]
    if done:
        kv.pos[moved] -= n_discard
        slot.cache = slot.cache[:n_keep] + tail
    else:
        kv.remove(sid, n_keep)
        slot.cache = slot.cache[:n_keep]
        slot.todo = tail + slot.todo
    slot.shifted = True
    log.info("slot %d: context shift: %d tokens, kept %d, dropped %d%s", sid, n_past, n_keep, n_discard,
             "" if done else " (recomputing the rest)")
