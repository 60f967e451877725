"""DRY ("don't repeat yourself") sampling, as llama.cpp's llama_sampler_dry (ported there from
koboldcpp): tokens that would extend a sequence already seen in the recent context lose
multiplier * base ** (length - allowed_length) of logit. Sequence breakers (strings) cut the
repetition search; they are turned into token sequences once per vocabulary."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ..model.tokenizer import Tokenizer
    from .cand import Cand

_MAX_CHAR_LEN = 40
_MAX_SEQ_LEN = 20
_FLOAT_MAX_LOG = 88.7228391


def dry_breakers(tokenizer: Tokenizer, breakers: Sequence[str]) -> dict[int, list[tuple[int, ...]]]:
    """head token -> the token tails that complete a breaker (llama.cpp's
    get_overlapping_token_sequences): every token whose text contains a breaker is a one-token
    breaker; a token whose text ends with the start of a breaker is a head, the rest of the
    breaker (tokenized, at most 20 tokens) its tail."""
    out: dict[int, list[tuple[int, ...]]] = {}
    pieces = [tokenizer.token_to_piece(i, special=True) for i in range(tokenizer.n_vocab)]
    for s in breakers:
        b = s.encode("utf-8")[:_MAX_CHAR_LEN]
        if not b:
            continue
        for tid, word in enumerate(pieces):
            if b in word:
                tails = out.setdefault(tid, [])
                if () not in tails:
                    tails.append(())
                continue
            pos = word.find(b[:1])
            while pos != -1:
                n = min(len(b), len(word) - pos)
                if word[pos:pos + n] == b[:n]:
                    rest = b[n:].decode("utf-8", "ignore")
                    tail = tuple(tokenizer.encode(rest, add_special=False, parse_special=False)[:_MAX_SEQ_LEN])
                    tails = out.setdefault(tid, [])
                    if tail not in tails:
                        tails.append(tail)
                pos = word.find(b[:1], pos + 1)
    return out


@dataclasses.dataclass
class DryState:
    multiplier: float
    base: float
    allowed_length: int
    penalty_last_n: int          # already resolved (-1 -> context size)
    total_context: int
    breakers: dict[int, list[tuple[int, ...]]]
    last: list[int] = dataclasses.field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return self.multiplier != 0.0 and self.base >= 1.0 and self.penalty_last_n != 0

    def accept(self, token: int) -> None:
        if not self.enabled:
            return
        self.last.append(token)
        if len(self.last) > self.penalty_last_n:
            del self.last[: len(self.last) - self.penalty_last_n]


def apply_dry(st: DryState, c: Cand) -> None:
    if not st.enabled:
        return
    n = min(len(st.last), st.penalty_last_n, st.total_context)
    if n <= st.allowed_length:
        return

    def rat(i: int) -> int:          # i-th token from the end
        return st.last[-1 - i]

    # 1: a breaker in the recent context limits how long a repetition can be
    rep_limit = n
    for i in range(n):
        tails = st.breakers.get(rat(i))
        if not tails:
            continue
        longest = -1
        for tail in tails:
            sl = len(tail)
            if longest < sl <= i and all(tail[o] == rat(i - o - 1) for o in range(sl)):
                longest = sl
        if longest >= 0:
            rep_limit = i - longest
            break
    if rep_limit < st.allowed_length:
        return

    # 2: reverse Z-algorithm: how long a suffix of the context repeats ending at each position
    count = [0] * n
    last = n - 1
    rt = lt = 0
    for k in range(1, n):
        if k > rt:
            m = 0
            while m + k < n and rat(m) == rat(m + k):
                m += 1
            count[last - k] = min(m, rep_limit)
            if m > 0:
                lt, rt = k, k + m - 1
        else:
            p = k - lt
            right = rt - k + 1
            if count[last - p] < right:
                count[last - k] = min(count[last - p], rep_limit)
            else:
                i = rt + 1
                while i < n and rat(i) == rat(i - k):
                    i += 1
                count[last - k] = min(i - k, rep_limit)
                lt, rt = k, i - 1

    # 3: the token after each repeat would extend it
    max_rep: dict[int, int] = {}
    for i in range(n - 1):
        r = count[i]
        if r >= st.allowed_length:
            tok = rat(n - 2 - i)
            if max_rep.get(tok, -1) < r:
                max_rep[tok] = r
    if not max_rep:
        return

    # 4: penalties (never on a single-token breaker)
    max_exp = int(_FLOAT_MAX_LOG / np.log(st.base)) if st.base > 1.000001 else 0
    toks = np.array([t for t in max_rep if () not in st.breakers.get(t, ())], dtype=np.int64)
    if not toks.size:
        return
    rows, which = c.rows_of(toks)
    for row, tok in zip(rows, toks[which], strict=True):
        e = max_rep[int(tok)] - st.allowed_length
        if max_exp > 0 and e > max_exp:
            e = max_exp
        c.logits[row] -= np.float32(st.multiplier * st.base ** e)
    c.sorted = False
