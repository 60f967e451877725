"""Speculative decoding: a drafter proposes the next few tokens of a decoding slot, the target model
verifies them in the same step as everything else, and the slot keeps the longest prefix its own
sampler agrees with (common/speculative.cpp and tools/server/server.cpp in llama.cpp).

Two drafters:
- `ModelDrafter` (`-md/--model-draft`): a small model with the target's vocabulary, in process or on
  its own nodes (`--rpc-draft`), with its own KV cells (sequence = slot id). It drafts greedily while
  its top token's probability is at least `p_min`.
- `NgramDrafter` (`--spec-type ngram-simple`): no second model. The last `n` tokens of the slot's
  context are looked up in that context; the `m` tokens that followed their latest earlier
  occurrence are the draft.

Verification (`Speculative.verify`): the step fed [last, d1..dk] with logits for all k+1 rows. Row i
is sampled by the slot's own sampler exactly as a plain decode step would (same chain, same RNG
draw, the same penalty/DRY/grammar state), so the output is the target's, token for token; while
the sampled token equals d(i+1) the next row is valid too. Every sampled token is its own event, in
order; a stop (EOG, stop string, n_predict, context) ends the run and the rest is discarded. The KV
cells of the rejected draft tokens are removed; the draft's own cells are trimmed on its next call
(the common prefix of what it holds and the slot's context).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

import numpy as np
from llamarpc.proto.errors import BackendError

from ..model.tokenizer import Tokenizer
from .forward import forward_micro_batches
from .kv_cells import KVCells
from .loader import Model
from .slot import Slot, SlotState, common_prefix
from .task import FinalEvent, PartialEvent

log = logging.getLogger(__name__)

VOCAB_MAX_SIZE_DIFFERENCE = 128     # llama.cpp's SPEC_VOCAB_MAX_SIZE_DIFFERENCE
VOCAB_CHECK_START_TOKEN_ID = 5      # ... and SPEC_VOCAB_CHECK_START_TOKEN_ID


@dataclasses.dataclass
class SpecParams:
    n_max: int = 16         # --draft-max
    n_min: int = 0          # --draft-min: a shorter draft is not verified (a plain decode instead)
    p_min: float = 0.8      # --draft-p-min: the draft model stops below this top-token probability

    def validate(self) -> None:
        if self.n_max < 0 or self.n_min < 0 or self.n_min > self.n_max:
            raise ValueError(f"--draft-min {self.n_min} / --draft-max {self.n_max}: need 0 <= min <= max")
        if not 0.0 <= self.p_min <= 1.0:
            raise ValueError(f"--draft-p-min {self.p_min} is outside [0, 1]")


@dataclasses.dataclass
class DraftRequest:
    slot: Slot
    ctx: list[int]      # the slot's tokens: its cache and the token about to be fed
    n_max: int
    n_min: int
    p_min: float


class NgramDrafter:
    """llama.cpp's `ngram-simple`: the tokens after the latest earlier occurrence of the last n."""

    name = "ngram-simple"

    def __init__(self, n: int = 12, m: int = 48) -> None:     # --spec-ngram-size-n, --spec-ngram-size-m
        if n < 1 or m < 1:
            raise ValueError("--spec-ngram-size-n and --spec-ngram-size-m must be at least 1")
        self.n, self.m = n, m

    def draft(self, reqs: Sequence[DraftRequest]) -> list[list[int]]:
        return [self.lookup(r.ctx, r.n_max) for r in reqs]

    def lookup(self, ctx: list[int], n_max: int) -> list[int]:
        n = self.n
        if len(ctx) <= n or n_max <= 0:
            return []
        x = np.asarray(ctx, dtype=np.int64)
        key = x[-n:]
        # windows starting at 0 .. len-n-1 (the last window is the key itself)
        win = np.lib.stride_tricks.sliding_window_view(x[:-1], n)
        hits = np.flatnonzero((win == key).all(axis=1))
        if not hits.size:
            return []
        start = int(hits[-1]) + n
        return [int(t) for t in x[start:start + min(self.m, n_max)]]


class ModelDrafter:
    """A draft model on its own pipeline and KV cells; each slot's cached tokens are tracked so a
    call feeds only what is new since the last one (and removes what the target rejected).

    A draft node that fails does not stop the streams: the steps decode without drafts, and every
    `retry_s` seconds the draft's nodes are re-attached (its KV cells then start empty)."""

    name = "draft"

    def __init__(self, model: Model, n_parallel: int, n_ubatch: int = 512, retry_s: float = 1.0) -> None:
        self.model = model
        self.retry_s = retry_s
        self.lost_at: float | None = None
        self.epoch = model.pipeline.epoch
        self.n_parallel = n_parallel
        self.n_ubatch = n_ubatch
        self.n_ctx_slot = model.n_ctx // n_parallel
        if self.n_ctx_slot < 2:
            raise ValueError(f"the draft context {model.n_ctx} is too small for {n_parallel} slots")
        self.kv = KVCells(model.n_ctx)
        self.cache: dict[int, list[int]] = {}

    def reset(self) -> None:
        self.kv = KVCells(self.model.n_ctx)
        self.cache = {}

    def draft(self, reqs: Sequence[DraftRequest]) -> list[list[int]]:
        """Every slot's draft at once: one forward brings each slot's cells up to its context (only
        what is new since the last call), then one forward per draft position feeds the slots still
        drafting (greedy, while the top token's probability is at least the slot's p_min)."""
        outs: list[list[int]] = [[] for _ in reqs]
        if not self._attached():
            return outs
        live = [i for i, r in enumerate(reqs) if min(r.n_max, self.n_ctx_slot - len(r.ctx)) > 0]
        if not live:
            return outs
        toks: list[int] = []
        pos: list[int] = []
        seq: list[int] = []
        want: list[bool] = []
        for i in live:
            r = reqs[i]
            sid = r.slot.id
            have = self.cache.get(sid, [])
            keep = min(common_prefix(have, r.ctx), len(r.ctx) - 1)     # the last token is fed: its logits
            self.kv.remove(sid, keep)
            self.cache[sid] = r.ctx[:]
            new = r.ctx[keep:]
            toks += new
            pos += range(keep, len(r.ctx))
            seq += [sid] * len(new)
            want += [False] * (len(new) - 1) + [True]
        try:
            logits = self._forward(toks, pos, seq, want)
            while live:
                feed = []
                for row, i in enumerate(live):
                    r = reqs[i]
                    tok = int(np.argmax(logits[row]))
                    if top_prob(np.asarray(logits[row], np.float64)) < r.p_min:
                        continue
                    outs[i].append(tok)
                    if len(outs[i]) < min(r.n_max, self.n_ctx_slot - len(r.ctx)):
                        feed.append(i)
                live = feed
                if not live:
                    break
                fed = [outs[i][-1] for i in live]
                sids = [reqs[i].slot.id for i in live]
                logits = self._forward(fed, [len(self.cache[sid]) for sid in sids], sids, [True] * len(live))
                for sid, tok in zip(sids, fed, strict=True):
                    self.cache[sid].append(tok)
        except BackendError as e:
            log.warning("draft model failed (%s): decoding without drafts until it is back", e)
            self.lost_at = time.monotonic()
            self.reset()
            return [[] for _ in reqs]
        return outs

    def _forward(self, toks: list[int], pos: list[int], seq: list[int], want: list[bool]) -> np.ndarray:
        return forward_micro_batches(self.model.pipeline, self.kv, np.array(toks, np.int32), np.array(pos, np.int32),
                                     np.array(seq, np.int32), np.array(want, bool), self.n_ubatch)

    def _attached(self) -> bool:
        pipeline = self.model.pipeline
        if self.lost_at is not None:
            if time.monotonic() - self.lost_at < self.retry_s:
                return False
            try:
                pipeline.ensure_attached()
            except BackendError:
                self.lost_at = time.monotonic()
                return False
            log.info("draft model's nodes attached again: drafting")
            self.lost_at = None
        if pipeline.epoch != self.epoch:        # re-attached or re-placed: its KV cache is gone
            self.epoch = pipeline.epoch
            self.reset()
        return True


def top_prob(logits: np.ndarray, k: int = 10) -> float:
    """The top token's probability among the k most likely (llama.cpp's draft sampler is top_k 10)."""
    top = np.partition(logits, -k)[-k:] if logits.size > k else logits
    return float(1.0 / np.exp(top - top.max()).sum())


def check_vocab(target: Tokenizer, draft: Tokenizer) -> None:
    """llama.cpp's common_speculative_are_compatible: the same tokenizer type, BOS/EOS, a vocabulary
    size within 128 and the same token texts from id 5 on; else a ValueError saying what differs."""
    if target.model != draft.model:
        raise ValueError(f"the draft model's tokenizer is {draft.model!r}, the target's {target.model!r}")
    if (target.bos_id, target.eos_id) != (draft.bos_id, draft.eos_id):
        raise ValueError(f"the draft model's BOS/EOS ({draft.bos_id}, {draft.eos_id}) differ from the target's "
                         f"({target.bos_id}, {target.eos_id})")
    diff = abs(target.n_vocab - draft.n_vocab)
    if diff > VOCAB_MAX_SIZE_DIFFERENCE:
        raise ValueError(f"the draft vocabulary has {draft.n_vocab} tokens, the target's {target.n_vocab} "
                         f"(at most {VOCAB_MAX_SIZE_DIFFERENCE} apart)")
    for i in range(VOCAB_CHECK_START_TOKEN_ID, min(target.n_vocab, draft.n_vocab)):
        if target.tokens[i] != draft.tokens[i]:
            raise ValueError(f"the draft model's token {i} is {draft.tokens[i]!r}, the target's {target.tokens[i]!r}")


class Speculative:
    """The engine's speculative decoding: which slots get a draft this step, and the verification of
    the rows that come back."""

    def __init__(self, drafters: Sequence[NgramDrafter | ModelDrafter], params: SpecParams, n_vocab: int) -> None:
        params.validate()
        if not drafters:
            raise ValueError("speculative decoding needs a drafter")
        self.drafters = list(drafters)      # the first that proposes something drafts (n-gram before a model)
        self.params = params
        self.n_vocab = n_vocab

    @property
    def name(self) -> str:
        return "+".join(d.name for d in self.drafters)

    def close(self) -> None:
        for d in self.drafters:
            if isinstance(d, ModelDrafter):
                d.model.close()

    def drafts(self, slots: Sequence[Slot]) -> dict[int, list[int]]:
        """A draft for each decoding slot that gets one (slot id -> tokens after its `todo[0]`): each
        drafter in turn drafts for the slots still without one."""
        reqs = [r for r in map(self._request, slots) if r is not None]
        out: dict[int, list[int]] = {}
        for drafter in self.drafters:
            if not reqs:
                break
            left = []
            for r, d in zip(reqs, drafter.draft(reqs), strict=True):
                d = d[:r.n_max]
                for i, t in enumerate(d):
                    if not 0 <= t < self.n_vocab:       # a draft vocabulary may be larger
                        d = d[:i]
                        break
                if d and len(d) >= r.n_min:
                    out[r.slot.id] = d
                else:
                    left.append(r)
            reqs = left
        return out

    def _request(self, s: Slot) -> DraftRequest | None:
        task = s.task
        if task is None or s.state != SlotState.GENERATING or len(s.todo) != 1:
            return None
        tp = task.params
        p = self.params
        n_max = tp.spec_n_max if tp.spec_n_max is not None else p.n_max
        n_min = tp.spec_n_min if tp.spec_n_min is not None else p.n_min
        n_max = min(n_max, s.n_ctx - len(s.cache) - 2)
        if tp.n_predict > 0:
            n_max = min(n_max, tp.n_predict - s.n_decoded - 1)
        if n_max < max(n_min, 1):
            return None
        return DraftRequest(s, s.cache + s.todo, n_max, n_min, tp.spec_p_min if tp.spec_p_min is not None else p.p_min)

    def verify(self, s: Slot, draft: list[int], logits: np.ndarray, tokenizer: Tokenizer,
               kv: KVCells) -> tuple[list[PartialEvent], FinalEvent | None, int]:
        """Sample the rows of [todo[0], d1..dk] in order while the draft agrees; the events, the final
        event if the slot stopped, and how many draft tokens were accepted. The slot's cache and todo
        end as after that many plain decode steps; the rejected tokens' KV cells are removed."""
        fed = s.todo[:1] + draft
        events: list[PartialEvent] = []
        final: FinalEvent | None = None
        n_acc = 0
        for i in range(len(fed)):
            s.cache.append(fed[i])
            evs, final = s.on_logits(logits[i], tokenizer)
            events += evs
            if final is not None or i == len(draft) or s.todo[0] != draft[i]:
                break
            n_acc += 1
        kv.remove(s.id, len(s.cache))
        s.n_draft += len(draft)
        s.n_draft_accepted += n_acc
        if final is not None:
            final.timings = s.timings()
        return events, final, n_acc
