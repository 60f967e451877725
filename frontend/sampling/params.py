"""Sampling parameters (llama.cpp's names and defaults) and the sampler names of the `samplers`
chain: llama.cpp's names and aliases, and --sampling-seq's one-character names."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .constraint import Grammar

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
    grammar: Grammar | None = None      # constrained decoding (constraint.py); None = free text

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
