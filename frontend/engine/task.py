"""What a handler hands the engine (a Task: prompt tokens + parameters + where its events go) and
what comes back (events). Events cross from the engine thread to the handler through `sink`,
which must be thread-safe (the API wraps loop.call_soon_threadsafe)."""
from __future__ import annotations

import dataclasses
import itertools
import re
import threading
import time
from collections.abc import Callable
from typing import Union

from ..sampling import SamplingParams

STOP_EOS, STOP_WORD, STOP_LIMIT = "eos", "word", "limit"
_ids = itertools.count(1)


@dataclasses.dataclass
class TaskParams:
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    n_predict: int = -1
    stop: tuple[str, ...] = ()
    stop_regex: re.Pattern[str] | None = None
    ignore_eos: bool = False
    cache_prompt: bool = True
    n_probs: int = 0
    post_sampling_probs: bool = False
    return_tokens: bool = False
    stream: bool = False
    id_slot: int = -1
    timings_per_token: bool = False
    n_keep: int = 0
    n_discard: int = 0              # context shift: tokens dropped after n_keep; 0 = half of the rest
    model: str = ""
    lora: tuple[float, ...] | None = None   # a scale per LoRA adapter; None: the global scales
    spec_n_max: int | None = None       # speculative.n_max / n_min / p_min of the request; None: the server's
    spec_n_min: int | None = None
    spec_p_min: float | None = None

    def to_json(self) -> dict:
        """llama.cpp's generation_settings / slot "params" object."""
        s = self.sampling
        return {
            "seed": s.effective_seed, "temperature": s.temperature, "dynatemp_range": s.dynatemp_range,
            "dynatemp_exponent": s.dynatemp_exponent, "top_k": s.top_k, "top_p": s.top_p, "min_p": s.min_p,
            "top_n_sigma": s.top_n_sigma, "xtc_probability": s.xtc_probability, "xtc_threshold": s.xtc_threshold,
            "typical_p": s.typical_p, "repeat_last_n": s.repeat_last_n, "repeat_penalty": s.repeat_penalty,
            "presence_penalty": s.presence_penalty, "frequency_penalty": s.frequency_penalty,
            "dry_multiplier": s.dry_multiplier, "dry_base": s.dry_base, "dry_allowed_length": s.dry_allowed_length,
            "dry_penalty_last_n": s.dry_penalty_last_n, "dry_sequence_breakers": list(s.dry_sequence_breakers),
            "mirostat": s.mirostat, "mirostat_tau": s.mirostat_tau, "mirostat_eta": s.mirostat_eta,
            "stop": list(self.stop), "max_tokens": self.n_predict, "n_predict": self.n_predict,
            "n_keep": self.n_keep, "n_discard": self.n_discard, "ignore_eos": self.ignore_eos, "stream": self.stream,
            "logit_bias": [{"bias": b if b != float("-inf") else False, "token": t} for t, b in s.logit_bias],
            "n_probs": self.n_probs, "min_keep": s.min_keep, "grammar": s.grammar.source if s.grammar is not None else "",
            "samplers": list(s.samplers),
            "timings_per_token": self.timings_per_token, "post_sampling_probs": self.post_sampling_probs,
            "cache_prompt": self.cache_prompt,
            "lora": [{"id": i, "scale": v} for i, v in enumerate(self.lora or ())],
            **({"speculative.n_max": self.spec_n_max, "speculative.n_min": self.spec_n_min,
                "speculative.p_min": self.spec_p_min} if self.spec_n_max is not None else {}),
        }


@dataclasses.dataclass
class TokenProb:
    id: int
    prob: float
    piece: bytes


@dataclasses.dataclass
class TokenOutput:
    """One generated token with its probability and the n_probs alternatives."""
    id: int
    prob: float
    piece: bytes
    top: list[TokenProb]


@dataclasses.dataclass
class Timings:
    cache_n: int = 0
    prompt_n: int = 0
    prompt_ms: float = 0.0
    predicted_n: int = 0
    predicted_ms: float = 0.0
    draft_n: int = 0                # speculative decoding: draft tokens verified ...
    draft_n_accepted: int = 0       # ... and accepted (llama-server reports both when draft_n > 0)

    def to_json(self) -> dict:
        out = {
            "cache_n": self.cache_n, "prompt_n": self.prompt_n, "prompt_ms": self.prompt_ms,
            "prompt_per_token_ms": self.prompt_ms / self.prompt_n if self.prompt_n else 0.0,
            "prompt_per_second": 1e3 * self.prompt_n / self.prompt_ms if self.prompt_ms else 0.0,
            "predicted_n": self.predicted_n, "predicted_ms": self.predicted_ms,
            "predicted_per_token_ms": self.predicted_ms / self.predicted_n if self.predicted_n else 0.0,
            "predicted_per_second": 1e3 * self.predicted_n / self.predicted_ms if self.predicted_ms else 0.0,
        }
        if self.draft_n > 0:
            out["draft_n"] = self.draft_n
            out["draft_n_accepted"] = self.draft_n_accepted
        return out


@dataclasses.dataclass
class PartialEvent:
    index: int
    text: str                   # new text to show (may be empty: held back, or a special token)
    tokens: list[int]
    probs: list[TokenOutput]
    n_decoded: int
    n_prompt: int
    id_slot: int
    timings: Timings | None = None


@dataclasses.dataclass
class FinalEvent:
    index: int
    content: str                # the whole generated text, stop word excluded
    tokens: list[int]
    stop_type: str
    stopping_word: str
    n_decoded: int
    n_prompt: int
    n_cached: int               # tokens in the slot's cache at the end (llama.cpp's tokens_cached)
    truncated: bool
    timings: Timings
    probs: list[TokenOutput]
    id_slot: int
    params: TaskParams
    prompt: list[int]
    has_new_line: bool = False


@dataclasses.dataclass
class ErrorEvent:
    index: int
    code: int
    message: str
    type: str


Event = Union[PartialEvent, FinalEvent, ErrorEvent]  # noqa: UP007 - a runtime alias (py3.10)


class Task:
    def __init__(self, prompt: list[int], params: TaskParams, sink: Callable[[Event], None], index: int = 0) -> None:
        self.id = next(_ids)
        self.index = index
        self.prompt = prompt
        self.params = params
        self.sink = sink
        self.t_arrival = time.perf_counter()
        self.parent: Task | None = None         # n > 1: the choice whose prompt cells this one copies (fork.py)
        self.children: list[Task] = []
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()
