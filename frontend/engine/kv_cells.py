"""KV-cache bookkeeping: which cache cell holds which (sequence, position).

The K/V tensors live on the nodes; the frontend decides the cells and sends, per step, the cells
to write and the (position, sequence) of every visible cell. A cell with position -1 is empty.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class _Slot(Protocol):
    id: int
    busy: bool
    cache: list[int]


class ContextFull(RuntimeError):
    """No free cache cells left for the tokens of a step."""


class KVCells:
    def __init__(self, n_ctx: int) -> None:
        if n_ctx <= 0:
            raise ValueError(f"context size must be positive, got {n_ctx}")
        self.n_ctx = n_ctx
        self.pos = np.full(n_ctx, -1, dtype=np.int32)
        self.seq = np.full(n_ctx, -1, dtype=np.int32)

    @property
    def n_used(self) -> int:
        return int(np.count_nonzero(self.pos >= 0))

    def used_len(self) -> int:
        """Cells [0, used_len) cover every used cell: what a step must let attention see."""
        used = np.flatnonzero(self.pos >= 0)
        return int(used[-1]) + 1 if used.size else 0

    def alloc(self, seq: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Claim one free cell per token (lowest first) and record its sequence and position."""
        n = len(pos)
        free = np.flatnonzero(self.pos < 0)
        if free.size < n:
            raise ContextFull(f"the KV cache is full: {n} tokens need cells, {free.size} of {self.n_ctx} free")
        cells = free[:n].astype(np.int32)
        self.pos[cells] = pos
        self.seq[cells] = seq
        return cells

    def remove(self, seq: int, p0: int = 0, p1: int | None = None) -> None:
        """Free the cells of `seq` with p0 <= position < p1 (all positions when p1 is None)."""
        sel = (self.seq == seq) & (self.pos >= p0)
        if p1 is not None:
            sel &= self.pos < p1
        self.pos[sel] = -1
        self.seq[sel] = -1

    def seq_len(self, seq: int) -> int:
        p = self.pos[self.seq == seq]
        return int(p.max()) + 1 if p.size else 0

    def view(self) -> tuple[np.ndarray, np.ndarray]:
        n = self.used_len()
        return self.pos[:n].copy(), self.seq[:n].copy()


def make_room(kv: KVCells, slots: Sequence[_Slot], n: int) -> None:
    """Free cells for n tokens outside the slots' sequences (embeddings, a prompt's logprobs) by
    dropping idle slots' cached prompts, when fewer than n are empty."""
    if int(np.count_nonzero(kv.pos < 0)) >= n:
        return
    for s in slots:
        if not s.busy and s.cache:
            kv.remove(s.id)
            s.cache = []
