"""`n` > 1: several choices from one prompt, the prompt computed once.

The API submits a group of tasks for one prompt: the leader (choice 0) and its children (choices
1..n-1, `task.parent` set, each with its own seed: see `choice_tasks`). The engine starts a group
only when all of it is in the queue and as many slots are free (llama.cpp's rule: n larger than
the slots is refused by the API). The leader prefills the prompt as any task; the children wait
in their slots and add no rows to any step. When the leader's prompt is done, its KV cells are
copied to each child's sequence on every node, and each child samples its first token from the
leader's logits row with its own sampler, then decodes on its own.

The copy is CopyTensor, per layer and per K/V, over each run of cells that is contiguous in both
the source and the destination. The cache is one [n_ctx, kv_dim] tensor per layer in a node's KV
buffer and a cell is one row of it, so a run of cells is one byte range. A fresh prompt's cells
are mostly a single run (cells are claimed lowest first), so a child costs 2 x n_layer copies
that the node already validates (both ranges are checked against their buffers), with no new op,
no graph to register per stage, and nothing that leaves the node. A graph op copying cells would
do the same work, at the price of a new op and its validation.

A child whose leader went away before the copy (cancelled, failed to start) prefills the prompt
itself; so does one whose copy failed (a node lost meanwhile: the next step finds the node gone
and the usual recovery replays every slot). A cancelled child, or a failed group, ends through
the engine's ordinary paths (every child is a busy slot with its own task).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from gguf import GGML_QUANT_SIZES
from llamarpc.proto.errors import BackendError

from ..sampling import LLAMA_DEFAULT_SEED
from .kv_cells import KVCells
from .slot import Slot
from .task import Event, Task, TaskParams

if TYPE_CHECKING:
    from .pipeline import Pipeline

log = logging.getLogger(__name__)


# -- the group, made by the API -------------------------------------------------------------------
def choice_params(params: TaskParams, j: int) -> TaskParams:
    """Choice j's parameters: with a fixed seed, seed + j (llama.cpp's child tasks), so the choices
    differ and the request repeats; without one each sampler draws its own seed anyway."""
    s = params.sampling
    if j == 0 or s.seed < 0 or s.effective_seed == LLAMA_DEFAULT_SEED:
        return params
    seed = (s.effective_seed + j) % LLAMA_DEFAULT_SEED      # never the "random seed" value
    return dataclasses.replace(params, sampling=dataclasses.replace(s, seed=seed))


def choice_tasks(prompt: list[int], params: TaskParams, n: int, sink: Callable[[Event], None],
                 base: int = 0) -> list[Task]:
    """n tasks for one prompt, indices base..base+n-1; choice 0 leads, the others are its children."""
    lead = Task(prompt, params, sink, index=base)
    tasks = [lead]
    for j in range(1, n):
        t = Task(prompt, choice_params(params, j), sink, index=base + j)
        t.parent = lead
        lead.children.append(t)
        tasks.append(t)
    return tasks


# -- copying cells on the nodes -------------------------------------------------------------------
def runs(src: np.ndarray, dst: np.ndarray) -> list[tuple[int, int, int]]:
    """(src start, dst start, length) of the stretches where both cell lists go up by one."""
    out: list[tuple[int, int, int]] = []
    for i, (a, b) in enumerate(zip(src.tolist(), dst.tolist())):
        if out and i and a == src[i - 1] + 1 and b == dst[i - 1] + 1:
            s, d, n = out[-1]
            out[-1] = (s, d, n + 1)
        else:
            out.append((a, b, 1))
    return out


def copy_cells(pipeline: Pipeline, src: np.ndarray, dst: np.ndarray) -> int:
    """Copy the K and V rows of cells `src` to cells `dst` on every stage; returns the copies made."""
    if src.shape != dst.shape:
        raise ValueError("source and destination cells differ in number")
    spans = runs(np.asarray(src), np.asarray(dst))
    n = 0
    for stage in pipeline.stages:
        b = stage.backend
        for k, v in stage.kv_refs.values():
            for ref in (k, v):
                block, size = GGML_QUANT_SIZES[ref.type]
                row = ref.shape[-1] // block * size
                for s, d, m in spans:
                    b.copy_tensor(ref.buffer_id, ref.offset + s * row, ref.buffer_id, ref.offset + d * row, m * row)
                    n += 1
    return n


def seq_cells(kv: KVCells, seq: int, n: int) -> np.ndarray:
    """The cells of positions 0..n-1 of `seq`, in position order (every one must be there)."""
    sel = np.flatnonzero(kv.seq == seq)
    sel = sel[np.argsort(kv.pos[sel], kind="stable")]
    if sel.size < n or not np.array_equal(kv.pos[sel[:n]], np.arange(n)):
        raise RuntimeError(f"sequence {seq} does not hold positions 0..{n - 1}")
    return sel[:n].astype(np.int32)


# -- the engine's side ----------------------------------------------------------------------------
class Forks:
    """Which slots wait for their leader's prompt (slot id -> the leader task)."""

    def __init__(self) -> None:
        self._waiting: dict[int, Task] = {}
        self.n_copies = 0           # CopyTensor calls made (for tests and logs)

    def waiting(self, s: Slot) -> bool:
        return s.id in self._waiting

    @staticmethod
    def group(task: Task, pending: Sequence[Task]) -> list[Task] | None:
        """The tasks to start together with `task` (itself first), or None while some of its
        children have not reached the queue yet."""
        if not task.children:
            return [task]
        kids = [t for t in task.children if not t.cancelled]
        here = {id(t) for t in pending}
        if any(id(t) not in here for t in kids):
            return None
        return [task, *kids]

    def park(self, s: Slot, leader: Task, kv: KVCells) -> None:
        """A child started in slot s: it holds no cells and feeds nothing until the copy."""
        kv.remove(s.id)
        s.cache, s.todo, s.n_cached = [], [], 0
        self._waiting[s.id] = leader

    def check(self, slots: Sequence[Slot]) -> None:
        """Forget released children; a child whose leader is no longer running prefills itself."""
        running = {id(s.task) for s in slots if s.busy and s.task is not None}
        for sid, lead in list(self._waiting.items()):
            s = slots[sid]
            if not s.busy or s.task is None:
                del self._waiting[sid]
            elif id(lead) not in running:
                log.info("slot %d: the leading choice went away; prefilling the prompt itself", sid)
                del self._waiting[sid]
                s.todo = list(s.task.prompt)

    def prompt_done(self, lead: Slot, slots: Sequence[Slot], kv: KVCells, pipeline: Pipeline) -> list[Slot]:
        """The leader's prompt is in the cache: copy its cells to each waiting child; returns the
        children that now sample from the leader's logits."""
        task = lead.task
        kids = [s for s in slots if self._waiting.get(s.id) is task]
        if not kids:
            return []
        n = len(lead.cache)
        src = seq_cells(kv, lead.id, n)
        ready = []
        for s in kids:
            del self._waiting[s.id]
            assert s.task is not None
            try:
                dst = kv.alloc(np.full(n, s.id, np.int32), np.arange(n, dtype=np.int32))
                self.n_copies += copy_cells(pipeline, src, dst)
            except (BackendError, RuntimeError) as e:   # ContextFull is a RuntimeError
                log.warning("slot %d: copying the prompt's cells failed (%s); prefilling it itself", s.id, e)
                kv.remove(s.id)
                s.todo = list(s.task.prompt)
                continue
            s.cache = list(lead.cache)
            s.prompt_done()
            # the prompt's timings and cache count are the leader's (llama.cpp's copy_state_to)
            s.n_cached, s.t_start, s.t_prompt_done = lead.n_cached, lead.t_start, lead.t_prompt_done
            ready.append(s)
        log.debug("slot %d: prompt of %d tokens copied to slots %s", lead.id, n, [s.id for s in ready])
        return ready
