"""A slot: one sequence of the KV cache (sequence id = slot id) and the request it is serving.

`cache` holds the tokens whose K/V are in the cache (positions 0..len-1), `todo` the tokens to
feed next: the rest of the prompt while the prompt is processed, then the one token just sampled.
Prefill and decode are one path: each step feeds some of every busy slot's `todo`.
"""
from __future__ import annotations

import enum
import time

import numpy as np

from ..model.tokenizer import Tokenizer
from ..sampling import Sampler, softmax_prob, token_probs
from .task import STOP_EOS, STOP_LIMIT, STOP_WORD, FinalEvent, PartialEvent, Task, Timings, TokenOutput, TokenProb
from .text import OutputText


class SlotState(enum.Enum):
    IDLE = 0
    PROMPT = 1
    GENERATING = 2


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x, y = np.asarray(a[:n]), np.asarray(b[:n])
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n


class Slot:
    def __init__(self, slot_id: int, n_ctx: int) -> None:
        self.id = slot_id
        self.n_ctx = n_ctx
        self.state = SlotState.IDLE
        self.task: Task | None = None
        self.cache: list[int] = []
        self.todo: list[int] = []
        self.sampler: Sampler | None = None
        self.out: OutputText | None = None
        self.generated: list[int] = []
        self.probs: list[TokenOutput] = []
        self.n_decoded = 0
        self.n_cached = 0
        self.t_start = self.t_prompt_done = self.t_last = 0.0
        self.last_used = 0.0
        self.has_new_line = False
        self.lora: tuple[float, ...] = ()   # the LoRA scales `cache` was computed with
        self.context_shift = False      # --context-shift: a full context is shifted, not the end
        self.shifted = False            # this request's context was shifted (it is "truncated")
        self.speculative = False        # the engine drafts for this slot (/slots "speculative")
        self.n_draft = self.n_draft_accepted = 0

    @property
    def busy(self) -> bool:
        return self.state != SlotState.IDLE

    @property
    def wants_logits(self) -> bool:
        """Sample when this step empties `todo` (a prompt-only request, n_predict 0, never samples)."""
        return self.task is not None and self.task.params.n_predict != 0

    def start(self, task: Task, n_cached: int, sampler: Sampler, tokenizer: Tokenizer) -> None:
        self.task = task
        self.state = SlotState.PROMPT
        self.n_cached = n_cached
        self.cache = task.prompt[:n_cached]
        self.todo = task.prompt[n_cached:]
        self.sampler = sampler
        self.out = OutputText(tokenizer, task.params.stop, task.params.stop_regex)
        self.generated, self.probs = [], []
        self.n_decoded = 0
        self.n_draft = self.n_draft_accepted = 0
        self.has_new_line = False
        self.shifted = False
        self.t_start = time.perf_counter()
        self.t_prompt_done = self.t_last = 0.0

    def release(self) -> None:
        self.state = SlotState.IDLE
        self.task = None
        self.todo = []
        self.sampler = None
        self.last_used = time.perf_counter()

    def timings(self) -> Timings:
        assert self.task is not None
        end = self.t_last or self.t_prompt_done
        return Timings(cache_n=self.n_cached, prompt_n=len(self.task.prompt) - self.n_cached,
                       prompt_ms=1e3 * (self.t_prompt_done - self.t_start) if self.t_prompt_done else 0.0,
                       predicted_n=self.n_decoded,
                       predicted_ms=1e3 * (end - self.t_prompt_done) if self.t_prompt_done else 0.0,
                       draft_n=self.n_draft, draft_n_accepted=self.n_draft_accepted)

    # -- after a step ---------------------------------------------------------------------------
    def prompt_done(self) -> None:
        self.t_prompt_done = time.perf_counter()
        self.state = SlotState.GENERATING

    def on_logits(self, logits: np.ndarray, tokenizer: Tokenizer) -> tuple[list[PartialEvent], FinalEvent | None]:
        """Sample the next token from `logits`, turn it into events, decide whether to go on."""
        task, sampler, out = self.task, self.sampler, self.out
        assert task is not None and sampler is not None and out is not None
        p = task.params
        res = sampler.sample_full(logits)
        tok = res.token
        self.t_last = time.perf_counter()
        self.n_decoded += 1
        self.generated.append(tok)
        probs: list[TokenOutput] = []
        if p.n_probs > 0:
            if p.post_sampling_probs:
                n = min(p.n_probs, res.ids.size)
                order = np.argsort(-res.probs, kind="stable")[:n]
                top = [TokenProb(int(res.ids[i]), float(res.probs[i]), tokenizer.token_to_piece(int(res.ids[i])))
                       for i in order]
                sel = np.flatnonzero(res.ids == tok)
                prob = float(res.probs[sel[0]]) if sel.size else 0.0
            else:
                ids, pr = token_probs(logits, p.n_probs)
                top = [TokenProb(int(i), float(q), tokenizer.token_to_piece(int(i)))
                       for i, q in zip(ids, pr, strict=True)]
                prob = softmax_prob(logits, tok)
            probs.append(TokenOutput(tok, prob, tokenizer.token_to_piece(tok), top))
            self.probs.extend(probs)
        stop = ""
        if tokenizer.is_eog(tok):
            stop = STOP_EOS
            text = ""
        else:
            text = out.push(tok)
            if "\n" in text:
                self.has_new_line = True
            if out.stopped:
                stop = STOP_WORD
        if not stop and sampler.constraint is not None and sampler.constraint.done:
            stop = STOP_EOS         # the grammar is complete: only end-of-generation may follow
        truncated = False
        if not stop and p.n_predict > 0 and self.n_decoded >= p.n_predict:
            stop = STOP_LIMIT
        if not stop and len(self.cache) >= self.n_ctx and not (self.context_shift and p.n_predict != -2):
            stop, truncated = STOP_LIMIT, True
        events = [PartialEvent(task.index, text, [tok], probs, self.n_decoded, len(task.prompt), self.id,
                               self.timings() if p.timings_per_token else None)]
        if not stop:
            self.todo = [tok]
            return events, None
        tail = out.finish()
        if tail:
            events.append(PartialEvent(task.index, tail, [], [], self.n_decoded, len(task.prompt), self.id))
        return events, self.final(stop, truncated)

    def final(self, stop: str, truncated: bool = False) -> FinalEvent:
        task, out = self.task, self.out
        assert task is not None and out is not None
        word = out.stopping_word if stop == STOP_WORD else ""
        return FinalEvent(task.index, out.text, list(self.generated), stop, word, self.n_decoded, len(task.prompt),
                          len(self.cache), truncated or self.shifted, self.timings(), list(self.probs), self.id, task.params,
                          task.prompt, self.has_new_line)

    def to_json(self) -> dict:
        """llama.cpp's /slots entry."""
        t = self.task
        params = t.params.to_json() if t is not None else {}
        return {
            "id": self.id, "id_task": t.id if t is not None else -1, "n_ctx": self.n_ctx, "speculative": self.speculative,
            "is_processing": self.busy, "state": self.state.value, "n_past": len(self.cache),
            "n_prompt_tokens": len(t.prompt) if t is not None else 0,
            "params": params,
            "next_token": {"has_next_token": self.busy, "has_new_line": self.has_new_line,
                           "n_remain": (t.params.n_predict - self.n_decoded) if t is not None and t.params.n_predict > 0
                           else -1,
                           "n_decoded": self.n_decoded},
        }
