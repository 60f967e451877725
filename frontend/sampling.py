"""Token sampling over numpy logits: llama.cpp's sampler chain (common/sampling.cpp and
src/llama-sampling.cpp), sampler for sampler, with llama.cpp's defaults.

The chain is: logit_bias, then the `samplers` list in order (default
penalties -> dry -> top_n_sigma -> top_k -> typ_p -> top_p -> min_p -> xtc -> temperature),
then `dist` (a seeded draw). With mirostat 1 or 2 the chain is logit_bias -> temperature ->
mirostat instead. ``Sampler.sample`` applies the chain, draws, and accepts the token (the state of
penalties, DRY and mirostat moves on), like ``llama_sampler_sample``.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

from .sampling_cand import Cand
from .sampling_dry import DryState, apply_dry

DEFAULT_SAMPLERS: tuple[str, ...] = ("penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc",
                                     "temperature")
DEFAULT_DRY_BREAKERS: tuple[str, ...] = ("\n", ":", "\"", "*")
LLAMA_DEFAULT_SEED = 0xFFFFFFFF

_CANONICAL = ("dry", "top_k", "top_p", "top_n_sigma", "typ_p", "min_p", "temperature", "xtc", "penalties")
_ALIASES: dict[str, str] = {"nucleus": "top_p", "temp": "temperature", "typ": "typ_p",
                            "typical_p": "typ_p", "typical": "typ_p"}
for _n in _CANONICAL:
    _ALIASES[_n] = _n
    if "_" in _n:
        _ALIASES[_n.replace("_", "-")] = _n
        _ALIASES[_n.replace("_", "")] = _n
_CHARS = {"e": "penalties", "d": "dry", "s": "top_n_sigma", "k": "top_k", "y": "typ_p", "p": "top_p",
          "m": "min_p", "x": "xtc", "t": "temperature"}


def samplers_from_names(names: Sequence[str]) -> tuple[str, ...]:
    """Canonical names for a `samplers` list (llama.cpp's names and aliases, any case).
    An unknown name is a ValueError (llama.cpp only logs it)."""
    out = []
    for n in names:
        if not isinstance(n, str):
            raise ValueError(f"sampler names must be strings, got {n!r}")
        c = _ALIASES.get(n.lower())
        if c is None:
            raise ValueError(f"unknown sampler {n!r} (known: {', '.join(_CANONICAL)})")
        out.append(c)
    return tuple(out)


def samplers_from_chars(chars: str) -> tuple[str, ...]:
    """Canonical names for a sampler sequence like 'edskypmxt' (--sampling-seq)."""
    out = []
    for ch in chars:
        if ch not in _CHARS:
            raise ValueError(f"unknown sampler character {ch!r} (known: {''.join(_CHARS)})")
        out.append(_CHARS[ch])
    return tuple(out)


@dataclasses.dataclass
class SamplingParams:
    # the first five stay in this order: the one-shot CLI builds them positionally
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    seed: int = -1
    dynatemp_range: float = 0.0
    dynatemp_exponent: float = 1.0
    typical_p: float = 1.0
    top_n_sigma: float = -1.0
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    repeat_last_n: int = 64
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = -1
    dry_sequence_breakers: tuple[str, ...] = DEFAULT_DRY_BREAKERS
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    min_keep: int = 0
    n_probs: int = 0
    samplers: tuple[str, ...] = DEFAULT_SAMPLERS
    logit_bias: tuple[tuple[int, float], ...] = ()

    def validate(self) -> None:
        if not 0.0 <= self.top_p <= 1.0 or not 0.0 <= self.min_p <= 1.0:
            raise ValueError("top_p and min_p must be in [0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.mirostat not in (0, 1, 2):
            raise ValueError(f"mirostat must be 0, 1 or 2, got {self.mirostat}")
        if self.repeat_last_n < -1 or self.dry_penalty_last_n < -1:
            raise ValueError("repeat_last_n and dry_penalty_last_n must be >= -1")
        if self.min_keep < 0 or self.n_probs < 0 or self.dry_allowed_length < 0:
            raise ValueError("min_keep, n_probs and dry_allowed_length must be >= 0")
        for name in ("temperature", "top_p", "min_p", "typical_p", "dynatemp_range", "dynatemp_exponent",
                     "xtc_probability", "xtc_threshold", "repeat_penalty", "presence_penalty", "frequency_penalty",
                     "dry_multiplier", "dry_base", "mirostat_tau", "mirostat_eta", "top_n_sigma"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number")
        samplers_from_names(self.samplers)

    @property
    def effective_seed(self) -> int:
        return self.seed & 0xFFFFFFFF if self.seed >= 0 else LLAMA_DEFAULT_SEED


# -- the samplers (each mirrors its llama.cpp namesake) ---------------------------------------------
def _top_k(c: Cand, k: int) -> None:
    if k <= 0:
        return
    k = min(k, len(c))
    if not c.sorted:
        c.sort(k)
    c.keep(slice(0, k))


def _top_p(c: Cand, p: float, min_keep: int) -> None:
    if p >= 1.0:
        return
    c.softmax(True)
    cum = np.cumsum(c.p)
    ok = np.flatnonzero((cum >= p) & (np.arange(1, len(c) + 1) >= min_keep))
    if ok.size:
        c.keep(slice(0, int(ok[0]) + 1))


def _min_p(c: Cand, p: float, min_keep: int) -> None:
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


def _typical(c: Cand, p: float, min_keep: int) -> None:
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


def _temp(c: Cand, t: float) -> None:
    if t <= 0.0:
        best = int(np.argmax(c.logits))
        mx = c.logits[best]
        c.logits = np.full_like(c.logits, -np.inf)
        c.logits[best] = mx
        return
    c.logits = c.logits / t


def _temp_ext(c: Cand, t: float, delta: float, exponent: float) -> None:
    if delta <= 0.0:
        _temp(c, t)
        return
    if len(c) <= 1:
        return
    lo, hi = max(0.0, t - delta), t + delta
    max_entropy = -math.log(1.0 / len(c))
    probs = c.softmax(True)
    nz = probs[probs > 0]
    entropy = float(-(nz * np.log(nz)).sum())
    dyn = lo + (hi - lo) * (entropy / max_entropy) ** exponent
    _temp(c, dyn)
    c.softmax(False)


def _xtc(c: Cand, prob: float, threshold: float, min_keep: int, rng: np.random.Generator) -> None:
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


def _top_n_sigma(c: Cand, n: float) -> None:
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


def _draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """llama_sampler_dist's draw: the first index whose running sum reaches u * total."""
    cum = np.cumsum(probs)
    i = int(np.searchsorted(cum, rng.random() * cum[-1], side="left"))
    return min(i, probs.size - 1)


@dataclasses.dataclass
class Sampled:
    token: int
    ids: np.ndarray      # the candidates left at the end of the chain ...
    probs: np.ndarray    # ... and their probabilities (what post_sampling_probs reports)


class Sampler:
    """One request's sampler: the chain of `params` plus its state (penalty window, DRY history,
    mirostat mu, the RNGs)."""

    def __init__(self, params: SamplingParams, n_vocab: int | None = None, n_ctx: int = 4096,
                 dry_breakers: dict[int, list[tuple[int, ...]]] | None = None) -> None:
        params.validate()
        self.params = params
        self.samplers = samplers_from_names(params.samplers)
        seed = params.effective_seed
        if seed == LLAMA_DEFAULT_SEED:
            seed = int(np.random.SeedSequence().entropy) & 0xFFFFFFFE
        self.seed = seed
        self.rng = np.random.Generator(np.random.MT19937(seed))          # dist / mirostat
        self.rng_xtc = np.random.Generator(np.random.MT19937(seed))      # xtc has its own stream
        self.n_vocab = n_vocab
        last_n = params.repeat_last_n if params.repeat_last_n >= 0 else n_ctx
        self._pen_n = max(last_n, 0)
        self._pen_prev: list[int] = []
        self._pen_count: dict[int, int] = {}
        dry_n = params.dry_penalty_last_n if params.dry_penalty_last_n >= 0 else n_ctx
        self.dry = DryState(params.dry_multiplier, params.dry_base, params.dry_allowed_length, dry_n, n_ctx,
                            dry_breakers or {})
        self.mu = 2.0 * params.mirostat_tau

    # -- state -----------------------------------------------------------------------------------
    def accept(self, token: int) -> None:
        """Feed a token to the stateful samplers (prompt tokens too, as llama.cpp's server does)."""
        if self._pen_n > 0:
            self._pen_count[token] = self._pen_count.get(token, 0) + 1
            if len(self._pen_prev) >= self._pen_n:
                old = self._pen_prev.pop(0)
                self._pen_count[old] -= 1
                if not self._pen_count[old]:
                    del self._pen_count[old]
            self._pen_prev.append(token)
        self.dry.accept(token)

    def accept_many(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            self.accept(int(t))

    # -- sampling --------------------------------------------------------------------------------
    def sample(self, logits: np.ndarray) -> int:
        return self.sample_full(logits).token

    def sample_full(self, logits: np.ndarray) -> Sampled:
        p = self.params
        c = Cand(np.arange(logits.size, dtype=np.int64), np.asarray(logits, dtype=np.float32).copy())
        for tok, bias in p.logit_bias:
            if 0 <= tok < logits.size:
                c.logits[tok] += np.float32(bias)   # a ban is -inf
        if p.mirostat == 0:
            for name in self.samplers:
                self._STEPS[name](self, c)
            probs = c.softmax(False)
            i = _draw(probs, self.rng)
        else:
            _temp(c, p.temperature)
            i = self._mirostat(c) if p.mirostat == 1 else self._mirostat_v2(c)
            probs = c.p if c.p is not None else c.softmax(False)
        tok = int(c.ids[i])
        self.accept(tok)
        return Sampled(tok, c.ids, probs)

    def _penalties(self, c: Cand) -> None:
        p = self.params
        if self._pen_n == 0 or (p.repeat_penalty == 1.0 and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0):
            return
        if not self._pen_count:
            return
        toks = np.fromiter(self._pen_count.keys(), dtype=np.int64)
        counts = np.fromiter(self._pen_count.values(), dtype=np.float32)
        idx, which = c.rows_of(toks)
        if not idx.size:
            return
        cnt = counts[which]
        lg = c.logits[idx]
        lg = np.where(lg <= 0, lg * p.repeat_penalty, lg / p.repeat_penalty)
        c.logits[idx] = lg - cnt * p.frequency_penalty - (cnt > 0) * p.presence_penalty
        c.sorted = False

    def _mirostat(self, c: Cand) -> int:
        p = self.params
        n_vocab = self.n_vocab or len(c)
        probs = c.softmax(True)
        m = 100
        n = min(m - 1, len(c) - 1)
        if n > 0:
            t = np.log(np.arange(2, n + 2) / np.arange(1, n + 1))
            with np.errstate(divide="ignore"):
                b = np.log(probs[:n] / probs[1:n + 1])
            s_hat = float((t * b).sum() / (t * t).sum())
        else:
            s_hat = 1.0
        eps = s_hat - 1
        try:
            k = ((eps * 2.0 ** self.mu) / (1 - n_vocab ** (-eps))) ** (1 / s_hat)
        except (ZeroDivisionError, OverflowError, ValueError):
            k = float(len(c))
        k = int(k) if math.isfinite(k) else len(c)
        _top_k(c, max(k, 1))
        probs = c.softmax(True)
        i = _draw(probs, self.rng)
        self.mu -= p.mirostat_eta * (-math.log2(max(probs[i], 1e-45)) - p.mirostat_tau)
        return i

    def _mirostat_v2(self, c: Cand) -> int:
        p = self.params
        probs = c.softmax(True)
        with np.errstate(divide="ignore"):
            over = np.flatnonzero(-np.log2(probs) > self.mu)
        c.keep(slice(0, max(int(over[0]) if over.size else len(c), 1)))
        probs = c.softmax(True)
        i = _draw(probs, self.rng)
        self.mu -= p.mirostat_eta * (-math.log2(max(probs[i], 1e-45)) - p.mirostat_tau)
        return i

    _STEPS: dict[str, Callable[[Sampler, Cand], None]] = {
        "penalties": lambda s, c: s._penalties(c),
        "dry": lambda s, c: apply_dry(s.dry, c),
        "top_n_sigma": lambda s, c: _top_n_sigma(c, s.params.top_n_sigma),
        "top_k": lambda s, c: _top_k(c, s.params.top_k),
        "typ_p": lambda s, c: _typical(c, s.params.typical_p, s.params.min_keep),
        "top_p": lambda s, c: _top_p(c, s.params.top_p, s.params.min_keep),
        "min_p": lambda s, c: _min_p(c, s.params.min_p, s.params.min_keep),
        "xtc": lambda s, c: _xtc(c, s.params.xtc_probability, s.params.xtc_threshold, s.params.min_keep, s.rng_xtc),
        "temperature": lambda s, c: _temp_ext(c, s.params.temperature, s.params.dynatemp_range,
                                              s.params.dynatemp_exponent),
    }


def token_probs(logits: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The n most probable tokens of a plain softmax over `logits` (n_probs without
    post_sampling_probs): (ids, probs), most probable first."""
    x = np.asarray(logits, dtype=np.float64)
    e = np.exp(x - x.max())
    probs = e / e.sum()
    n = min(n, probs.size)
    top = np.argpartition(-probs, n - 1)[:n] if n < probs.size else np.arange(probs.size)
    top = top[np.argsort(-probs[top], kind="stable")]
    return top, probs[top]


def softmax_prob(logits: np.ndarray, token: int) -> float:
    x = np.asarray(logits, dtype=np.float64)
    m = x.max()
    return float(np.exp(x[token] - m) / np.exp(x - m).sum())
