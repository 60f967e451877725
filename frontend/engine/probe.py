"""The logits of one token sequence, for fidelity checks (the tests, scripts/fidelity_modes.py):
tokens go through the same micro-batched forward as the engine's steps, into one sequence of a KV
bookkeeping of its own. Nothing is sampled or streamed here: generation is the Engine's alone
(the one-shot CLI and the server both submit tasks to it)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .forward import forward_micro_batches
from .kv_cells import KVCells
from .loader import Model


class LogitsProbe:
    """`eval` appends tokens to sequence `seq` and returns their logits; `reset` empties it. Use
    one at a time per model, and not while an engine runs on it (they share the nodes' cache)."""

    def __init__(self, model: Model, n_batch: int = 512, seq: int = 0) -> None:
        if n_batch <= 0:
            raise ValueError("batch size must be positive")
        self.model = model
        self.n_batch = n_batch
        self.seq = seq
        self.kv = KVCells(model.n_ctx)
        self.n_past = 0

    def reset(self) -> None:
        self.kv.remove(self.seq)
        self.n_past = 0

    def eval(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append `tokens` to the sequence (in forwards of at most n_batch tokens); return the
        logits of the last token ([n_vocab]) or of every token ([len(tokens), n_vocab])."""
        toks = np.asarray(tokens, dtype=np.int32)
        if toks.size == 0:
            raise ValueError("nothing to evaluate")
        if self.n_past + toks.size > self.model.n_ctx:
            raise ValueError(f"{self.n_past + toks.size} tokens exceed the context size {self.model.n_ctx}")
        if toks.min() < 0 or toks.max() >= self.model.n_vocab:
            raise ValueError(f"token ids must be in [0, {self.model.n_vocab})")
        pos = np.arange(self.n_past, self.n_past + toks.size, dtype=np.int32)
        seq = np.full(toks.size, self.seq, dtype=np.int32)
        want = np.ones(toks.size, bool) if all_logits else np.arange(toks.size) == toks.size - 1
        try:
            out = forward_micro_batches(self.model.pipeline, self.kv, toks, pos, seq, want, self.n_batch)
        except BaseException:
            self.kv.remove(self.seq, self.n_past)
            raise
        self.n_past += toks.size
        return out if all_logits else out[-1]
