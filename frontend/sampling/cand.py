"""The candidate set the sampler steps (steps.py, dry.py, sampler.py) work on: a leaf module, so
the steps import it and not each other."""
from __future__ import annotations

import numpy as np


class Cand:
    """llama_token_data_array: candidate ids, their logits and (after a softmax) probabilities."""

    __slots__ = ("ids", "logits", "p", "sorted", "identity")

    def __init__(self, ids: np.ndarray, logits: np.ndarray) -> None:
        self.ids = ids
        self.logits = logits
        self.p: np.ndarray | None = None
        self.sorted = False
        self.identity = True     # ids == arange(n_vocab): a token's row is its id

    def rows_of(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, which) for the given token ids that are still candidates."""
        if self.identity:
            which = np.flatnonzero((tokens >= 0) & (tokens < len(self)))
            return tokens[which], which
        order = np.argsort(self.ids, kind="stable")
        at = np.searchsorted(self.ids, tokens, sorter=order)
        at = np.minimum(at, len(self) - 1)
        rows = order[at]
        which = np.flatnonzero(self.ids[rows] == tokens)
        return rows[which], which

    def __len__(self) -> int:
        return int(self.ids.size)

    def keep(self, idx: np.ndarray | slice) -> None:
        self.identity = False
        self.ids, self.logits = self.ids[idx], self.logits[idx]
        if self.p is not None:
            self.p = self.p[idx]

    def sort(self, k: int | None = None) -> None:
        """Sort by logit, descending (stable); with k, keep only the top k."""
        n = len(self)
        if k is not None and k < n:
            part = np.argpartition(-self.logits, k - 1)[:k]
            order = part[np.argsort(-self.logits[part], kind="stable")]
        else:
            order = np.argsort(-self.logits, kind="stable")
        self.keep(order)
        self.sorted = True

    def softmax(self, do_sort: bool) -> np.ndarray:
        if do_sort and not self.sorted:
            self.sort()
        x = self.logits.astype(np.float64)
        e = np.exp(x - x.max())
        self.p = e / e.sum()
        return self.p
