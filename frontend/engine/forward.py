"""One forward step as micro-batches: what the engine, the draft model and the probe all run."""
from __future__ import annotations

import numpy as np

from .kv_cells import KVCells
from .pipeline import Pipeline


def forward_micro_batches(pipeline: Pipeline, kv: KVCells, tokens: np.ndarray, pos: np.ndarray, seq: np.ndarray,
                          want: np.ndarray, n_ubatch: int, lora: np.ndarray | None = None) -> np.ndarray:
    """One step as micro-batches of at most n_ubatch tokens, each given its KV cells; the logits
    of the `want` rows. `lora`: each row's LoRA adapter scales (None: the global ones)."""
    outs = []
    for a in range(0, tokens.size, n_ubatch):
        sl = slice(a, a + n_ubatch)
        cells = kv.alloc(seq[sl], pos[sl])
        kv_pos, kv_seq = kv.view()
        rows = np.flatnonzero(want[sl]).astype(np.int32)
        extra = {} if lora is None else {"lora": lora[sl]}
        outs.append(pipeline.forward(tokens[sl], pos[sl], seq[sl], cells, kv_pos, kv_seq, rows, **extra))
    return np.concatenate(outs, axis=0) if len(outs) > 1 else outs[0]
