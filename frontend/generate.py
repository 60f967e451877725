"""A single-sequence generate loop over the KV cache: prefill in batches, then decode one token a
step. The one-shot CLI uses it; the server's engine (slots, continuous batching) builds on the same
Pipeline.forward."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence

import numpy as np

from .kv_cells import KVCells
from .model import Model
from .sampling import Sampler


@dataclasses.dataclass
class Timings:
    n_prompt: int = 0
    prompt_seconds: float = 0.0
    n_gen: int = 0
    gen_seconds: float = 0.0

    @property
    def prompt_tps(self) -> float:
        return self.n_prompt / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def gen_tps(self) -> float:
        return self.n_gen / self.gen_seconds if self.gen_seconds else 0.0


class Generator:
    def __init__(self, model: Model, n_batch: int = 512, seq: int = 0) -> None:
        if n_batch <= 0:
            raise ValueError("batch size must be positive")
        self.model = model
        self.n_batch = n_batch
        self.seq = seq
        self.kv = KVCells(model.n_ctx)
        self.n_past = 0
        self.timings = Timings()

    def reset(self) -> None:
        self.kv.remove(self.seq)
        self.n_past = 0

    def eval(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append `tokens` to the sequence; return logits of the last token ([n_vocab]) or of
        every token ([len(tokens), n_vocab])."""
        toks = np.asarray(tokens, dtype=np.int32)
        if toks.size == 0:
            raise ValueError("nothing to evaluate")
        if self.n_past + toks.size > self.model.n_ctx:
            raise ValueError(f"{self.n_past + toks.size} tokens exceed the context size {self.model.n_ctx}")
        if toks.min() < 0 or toks.max() >= self.model.n_vocab:
            raise ValueError(f"token ids must be in [0, {self.model.n_vocab})")
        outs = []
        for s in range(0, toks.size, self.n_batch):
            chunk = toks[s:s + self.n_batch]
            n = chunk.size
            pos = np.arange(self.n_past, self.n_past + n, dtype=np.int32)
            seq = np.full(n, self.seq, dtype=np.int32)
            cells = self.kv.alloc(seq, pos)
            kv_pos, kv_seq = self.kv.view()
            last_chunk = s + n >= toks.size
            if all_logits:
                rows = np.arange(n, dtype=np.int32)
            elif last_chunk:
                rows = np.array([n - 1], dtype=np.int32)
            else:
                rows = np.zeros(0, dtype=np.int32)
            try:
                logits = self.model.pipeline.forward(chunk, pos, seq, cells, kv_pos, kv_seq, rows)
            except BaseException:
                self.kv.remove(self.seq, self.n_past)
                raise
            self.n_past += n
            outs.append(logits)
        out = np.concatenate(outs, axis=0)
        return out if all_logits else out[-1]

    def generate(self, prompt: Sequence[int], n_predict: int, sampler: Sampler,
                 ignore_eos: bool = False) -> Iterator[int]:
        """Yield sampled tokens until n_predict (-1: until end of generation or a full context)."""
        self.reset()
        self.model.pipeline.ensure_attached()   # a node lost since the last generation comes back here
        self.timings = Timings(n_prompt=len(prompt))
        t0 = time.perf_counter()
        logits = self.eval(prompt)
        self.timings.prompt_seconds = time.perf_counter() - t0
        tok_start = time.perf_counter()
        n = 0
        while n_predict < 0 or n < n_predict:
            tok = sampler.sample(logits)
            if not ignore_eos and self.model.tokenizer.is_eog(tok):
                break
            n += 1
            self.timings.n_gen = n
            yield tok
            if n == n_predict or self.n_past >= self.model.n_ctx:
                break
            logits = self.eval([tok])
            self.timings.gen_seconds = time.perf_counter() - tok_start
        self.timings.gen_seconds = time.perf_counter() - tok_start
