"""Token sampling over numpy logits, following llama.cpp's default chain order:
penalties -> top_k -> typical -> top_p -> min_p -> temperature -> distribution (seeded)."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    seed: int = -1

    def validate(self) -> None:
        if not 0.0 <= self.top_p <= 1.0 or not 0.0 <= self.min_p <= 1.0:
            raise ValueError("top_p and min_p must be in [0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        params.validate()
        self.params = params
        seed = params.seed if params.seed >= 0 else None
        self.rng = np.random.default_rng(seed)

    def sample(self, logits: np.ndarray) -> int:
        p = self.params
        if p.temperature <= 0:
            return int(np.argmax(logits))
        logits = logits.astype(np.float64)
        ids = np.arange(logits.size)
        if 0 < p.top_k < logits.size:
            keep = np.argpartition(-logits, p.top_k - 1)[: p.top_k]
            ids, logits = ids[keep], logits[keep]
        order = np.argsort(-logits, kind="stable")
        ids, logits = ids[order], logits[order]
        probs = _softmax(logits)
        if p.top_p < 1.0:
            n = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            ids, logits, probs = ids[:n], logits[:n], probs[:n]
        if p.min_p > 0.0:
            keep = probs >= p.min_p * probs[0]
            ids, logits = ids[keep], logits[keep]
        probs = _softmax(logits / p.temperature)
        return int(ids[self.rng.choice(ids.size, p=probs)])


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()
