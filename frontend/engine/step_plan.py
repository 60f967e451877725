"""One engine step's plan: the tokens to compute for each slot, prefill and decode alike (as vLLM's
scheduler plans "tokens to compute per request"), and the batch arrays the pipeline runs.

Decoding slots give one token each (plus a speculative draft, every row verified); slots still in
their prompt fill what the step budget leaves, oldest request first; a recovery replay replaces
the plan with its own parts."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from .slot import Slot

Part = tuple[Slot, int, bool]   # (slot, tokens of its `todo` taken, whether its last one needs logits)


@dataclasses.dataclass
class StepPlan:
    parts: list[Part]
    drafts: dict[int, list[int]]        # slot id -> draft tokens verified in this step
    tokens: np.ndarray
    pos: np.ndarray
    seq: np.ndarray
    want: np.ndarray                    # rows whose logits come back
    lora: np.ndarray | None             # each row's LoRA scales (None: no adapters)
    n_decode: int
    n_prompt: int
    replay: bool

    @property
    def kind(self) -> str:
        """decode, prompt, mixed or replay (the step-time histogram's label)."""
        if self.replay:
            return "replay"
        return "mixed" if self.n_decode and self.n_prompt else "decode" if self.n_decode else "prompt"


def schedule(dec: Sequence[Slot], pre: Sequence[Slot], budget: int) -> list[Part]:
    """Each decoding slot's next token, then prompt chunks of `pre` (in order) within `budget` tokens."""
    parts: list[Part] = [(s, 1, True) for s in dec]
    left = budget
    for s in pre:
        if left <= 0:
            break
        take = min(len(s.todo), left)
        left -= take
        parts.append((s, take, take == len(s.todo) and s.wants_logits))
    return parts


def build(parts: list[Part], drafts: dict[int, list[int]], n_decode: int, replay: bool,
          with_lora: bool) -> StepPlan:
    toks: list[int] = []
    pos: list[int] = []
    seq: list[int] = []
    want: list[bool] = []
    lora: list[tuple[float, ...]] = []
    for s, take, out in parts:
        d = drafts.get(s.id, [])      # a decoding slot's draft: every row is verified
        n = take + len(d)
        toks += s.todo[:take] + d
        pos += range(len(s.cache), len(s.cache) + n)
        seq += [s.id] * n
        want += [False] * (take - 1) + [out] + [True] * len(d)
        if with_lora:
            lora += [s.lora] * n
    n_prompt = len(toks) - n_decode - sum(map(len, drafts.values()))
    return StepPlan(parts, drafts, np.array(toks, np.int32), np.array(pos, np.int32), np.array(seq, np.int32),
                    np.array(want, bool), np.array(lora, np.float32) if with_lora else None, n_decode, n_prompt,
                    replay)
