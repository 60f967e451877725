"""How many prompt tokens a step may carry while other slots are decoding.

A step's time is roughly (decode-only time for its decoding slots) + (cost per prompt token) x
(prompt tokens). Both are measured as the engine runs (exponential moving averages). While any
slot decodes, prompt tokens are capped so that a step takes about `stall_factor` times a
decode-only step: a long prompt arriving slows the running streams by a bounded factor instead of
stalling them for the whole prefill."""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

_ALPHA = 0.3


class StepBudget:
    def __init__(self, n_batch: int, stall_factor: float = 1.4, fixed_chunk: int = 0, min_chunk: int = 4) -> None:
        self.n_batch = n_batch
        self.stall_factor = stall_factor
        self.fixed_chunk = fixed_chunk
        self.min_chunk = min_chunk
        self.decode_s: dict[int, float] = {}     # n decoding slots -> seconds of a decode-only step
        self.prompt_tok_s: float | None = None    # seconds per prompt token, measured in mixed steps
        self.prefill_tok_s: float | None = None   # ... in prompt-only steps (cheaper per token: a fallback)

    @staticmethod
    def _ema(old: float | None, new: float) -> float:
        return new if old is None else (1 - _ALPHA) * old + _ALPHA * new

    def decode_time(self, n_dec: int) -> float | None:
        if n_dec in self.decode_s:
            return self.decode_s[n_dec]
        if not self.decode_s:
            return None
        k = min(self.decode_s, key=lambda m: abs(m - n_dec))
        return self.decode_s[k] * (1 + n_dec) / (1 + k)

    def observe(self, n_dec: int, n_prompt: int, seconds: float) -> None:
        if n_prompt == 0:
            if n_dec:
                self.decode_s[n_dec] = self._ema(self.decode_s.get(n_dec), seconds)
            return
        if n_dec == 0:
            self.prefill_tok_s = self._ema(self.prefill_tok_s, seconds / n_prompt)
            return
        base = self.decode_time(n_dec)
        if base is not None:
            self.prompt_tok_s = self._ema(self.prompt_tok_s, max(seconds - base, 0.0) / n_prompt)

    def prompt_tokens(self, n_dec: int) -> int:
        """Prompt tokens the next step may carry next to `n_dec` decoding slots."""
        room = max(self.n_batch - n_dec, 0)
        if n_dec == 0:
            return room
        if self.fixed_chunk > 0:
            return min(room, self.fixed_chunk)
        base = self.decode_time(n_dec)
        per = self.prompt_tok_s if self.prompt_tok_s is not None else (
            1.5 * self.prefill_tok_s if self.prefill_tok_s is not None else None)
        if base is None or not per:
            return min(room, 32)
        n = int((self.stall_factor - 1.0) * base / per)
        return min(room, max(n, self.min_chunk))

    def warm_up(self, forward: Callable[..., object], reset: Callable[[], None], n_vocab: int, n_ctx: int,
                n_ubatch: int) -> bool:
        """Run a prefill, a decode and a mixed step through `forward(tokens, pos, seq, want)` twice:
        the first pass pays one-time costs (compiled programs, caches), the second gives the budget
        its first timings. `reset` empties the KV cache before each pass and after. False: too
        small a context to try."""
        chunk = min(16, (n_ctx - 3) // 2, n_ubatch - 1)
        if chunk < 2:
            return False
        toks = (np.arange(chunk + 1) % n_vocab).astype(np.int32)
        s0 = np.zeros(chunk, np.int32)
        steps = ((0, chunk, toks[:chunk], np.arange(chunk, dtype=np.int32), s0),
                 (1, 0, toks[:1], np.array([chunk], np.int32), s0[:1]),
                 (1, chunk, toks, np.concatenate([[chunk + 1], np.arange(chunk)]).astype(np.int32),
                  np.concatenate([[0], np.ones(chunk)]).astype(np.int32)))
        for timed in (False, True):
            reset()
            for n_dec, n_prompt, tokens, pos, seq in steps:
                want = np.zeros(tokens.size, bool)
                want[0] = True
                t0 = time.perf_counter()
                forward(tokens, pos, seq, want)
                if timed:
                    self.observe(n_dec, n_prompt, time.perf_counter() - t0)
        reset()
        return True
