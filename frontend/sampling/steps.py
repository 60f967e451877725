"""The stateless sampler steps, each a function of the candidate set and its parameters that
mirrors its llama.cpp namesake (src/llama-sampling.cpp), and the seeded draw. The stateful ones
(penalties, mirostat) are Sampler methods; DRY is dry.py."""
from __future__ import annotations

import math

import numpy as np

from .cand import Cand


def top_k(c: Cand, k: int) -> None:
    if k <= 0:
        return
    k = min(k, len(c))
    if not c.sorted:
        c.sort(k)
    c.keep(slice(0, k))


def top_p(c: Cand, p: float, min_keep: int) -> None:
    if p >= 1.0:
        return
    c.softmax(True)
    cum = np.cumsum(c.p)
    ok = np.flatnonzero((cum >= p) & (np.arange(1, len(c) + 1) >= min_keep))
    if ok.size:
        c.keep(slice(0, int(ok[0]) + 1))


def min_p(c: Cand, p: float, min_keep: int) -> None:
    if p <= 0.0 or not len(c):
        return
    if not c.sorted:
        keep = c.logits >= c.logits.max() + math.log(p)
        n = int(keep.sum())
        if n and n >= min_keep:
            c.keep(keep)
            return
        c.sort()
    min_logit = c.logits[0] + math.log(p)
    i = 1
    while i < len(c) and not (c.logits[i] < min_logit and i >= min_keep):
        i += 1
    c.keep(slice(0, i))


def typical(c: Cand, p: float, min_keep: int) -> None:
    if p >= 1.0:
        return
    probs = c.softmax(True)
    with np.errstate(divide="ignore", invalid="ignore"):
        logp = np.log(probs)
        entropy = -np.nansum(probs * logp)
        shifted = np.abs(-logp - entropy)
    order = np.argsort(shifted, kind="stable")
    cum = np.cumsum(probs[order])
    last = len(order)
    for i in range(len(order)):
        if cum[i] > p and (min_keep == 0 or i >= min_keep - 1):
            last = i + 1
            break
    c.keep(order[:last])
    c.sorted = False


def temp(c: Cand, t: float) -> None:
    if t <= 0.0:
        best = int(np.argmax(c.logits))
        mx = c.logits[best]
        c.logits = np.full_like(c.logits, -np.inf)
        c.logits[best] = mx
        return
    c.logits = c.logits / t


def temp_ext(c: Cand, t: float, delta: float, exponent: float) -> None:
    if delta <= 0.0:
        temp(c, t)
        return
    if len(c) <= 1:
        return
    lo, hi = max(0.0, t - delta), t + delta
    max_entropy = -math.log(1.0 / len(c))
    probs = c.softmax(True)
    nz = probs[probs > 0]
    entropy = float(-(nz * np.log(nz)).sum())
    dyn = lo + (hi - lo) * (entropy / max_entropy) ** exponent
    temp(c, dyn)
    c.softmax(False)


def xtc(c: Cand, prob: float, threshold: float, min_keep: int, rng: np.random.Generator) -> None:
    if prob <= 0.0 or threshold > 0.5 or len(c) < 2:
        return
    if rng.random() > prob:
        return
    probs = c.softmax(True)
    above = probs >= threshold
    pos_last = 0
    for i in range(len(c)):
        if above[i]:
            pos_last = i
        else:
            break
    if len(c) - pos_last >= min_keep and pos_last > 0:
        c.keep(slice(pos_last, None))


def top_n_sigma(c: Cand, n: float) -> None:
    if n <= 0.0 or len(c) <= 1:
        return
    valid = c.logits[c.logits != -np.inf]
    mx = float(c.logits.max())
    mean = float(valid.mean()) if valid.size else 0.0
    std = float(np.sqrt(((valid - mean) ** 2).mean())) if valid.size else 0.0
    logits = c.logits.copy()
    logits[logits < mx - n * std] = -np.inf
    c.logits = logits
    c.softmax(True)


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """llama_sampler_dist's draw: the first index whose running sum reaches u * total."""
    cum = np.cumsum(probs)
    i = int(np.searchsorted(cum, rng.random() * cum[-1], side="left"))
    return min(i, probs.size - 1)
