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

from .cand import Cand
from .constraint import Constraint
from .dry import DryState, apply_dry
from .params import LLAMA_DEFAULT_SEED, SamplingParams, samplers_from_names
from .steps import draw, min_p, temp, temp_ext, top_k, top_n_sigma, top_p, typical, xtc


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
        self.constraint: Constraint | None = params.grammar.start() if params.grammar is not None else None

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
        """The chain, the draw, and accept. With a grammar: mode "check" runs the chain on the
        raw logits and, only when the grammar refuses the token drawn, masks the logits and runs
        it again (llama.cpp's way); mode "mask" masks before every chain."""
        con = self.constraint
        if con is None:
            res = self._chain(logits, None)
        elif con.mode == "mask":
            res = self._chain(logits, con)
        else:
            mu = self.mu
            res = self._chain(logits, None)
            if not con.allows(res.token):
                self.mu = mu                        # mirostat's step is redone with the mask
                res = self._chain(logits, con)
        self.accept(res.token)
        if con is not None:
            con.accept(res.token)
        return res

    def _chain(self, logits: np.ndarray, con: Constraint | None) -> Sampled:
        p = self.params
        c = Cand(np.arange(logits.size, dtype=np.int64), np.asarray(logits, dtype=np.float32).copy())
        for tok, bias in p.logit_bias:
            if 0 <= tok < logits.size:
                c.logits[tok] += np.float32(bias)   # a ban is -inf
        if con is not None:
            allowed = con.allowed(logits.size)
            if not np.isfinite(c.logits[allowed]).any():
                # logit_bias banned every token the grammar allows: the grammar wins
                c.logits = np.asarray(logits, dtype=np.float32).copy()
            c.logits[~allowed] = -np.inf
        if p.mirostat == 0:
            for name in self.samplers:
                self._STEPS[name](self, c)
            probs = c.softmax(False)
            i = draw(probs, self.rng)
        else:
            temp(c, p.temperature)
            i = self._mirostat(c) if p.mirostat == 1 else self._mirostat_v2(c)
            probs = c.p if c.p is not None else c.softmax(False)
        return Sampled(int(c.ids[i]), c.ids, probs)

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
        top_k(c, max(k, 1))
        probs = c.softmax(True)
        i = draw(probs, self.rng)
        self.mu -= p.mirostat_eta * (-math.log2(max(probs[i], 1e-45)) - p.mirostat_tau)
        return i

    def _mirostat_v2(self, c: Cand) -> int:
        p = self.params
        probs = c.softmax(True)
        with np.errstate(divide="ignore"):
            over = np.flatnonzero(-np.log2(probs) > self.mu)
        c.keep(slice(0, max(int(over[0]) if over.size else len(c), 1)))
        probs = c.softmax(True)
        i = draw(probs, self.rng)
        self.mu -= p.mirostat_eta * (-math.log2(max(probs[i], 1e-45)) - p.mirostat_tau)
        return i

    _STEPS: dict[str, Callable[[Sampler, Cand], None]] = {
        "penalties": lambda s, c: s._penalties(c),
        "dry": lambda s, c: apply_dry(s.dry, c),
        "top_n_sigma": lambda s, c: top_n_sigma(c, s.params.top_n_sigma),
        "top_k": lambda s, c: top_k(c, s.params.top_k),
        "typ_p": lambda s, c: typical(c, s.params.typical_p, s.params.min_keep),
        "top_p": lambda s, c: top_p(c, s.params.top_p, s.params.min_keep),
        "min_p": lambda s, c: min_p(c, s.params.min_p, s.params.min_keep),
        "xtc": lambda s, c: xtc(c, s.params.xtc_probability, s.params.xtc_threshold, s.params.min_keep, s.rng_xtc),
        "temperature": lambda s, c: temp_ext(c, s.params.temperature, s.params.dynatemp_range,
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
