"""The probabilities of a prompt's own tokens (/v1/completions `echo` with `logprobs`): token i's
probability under the model's distribution after tokens 0..i-1, and the n most probable there.

Runs on the engine thread (Engine.call) between two steps: the prompt goes through the usual
micro-batched forward in a sequence no slot uses, every row's logits wanted, in forwards of as
many rows as LOGITS_BYTES of logits hold (at most n_ubatch): what a node sends back stays far
below a gRPC message's 64 MiB, and what is held here stays bounded. Its cells are freed after.
The first token has no probability (nothing precedes it): its entry is None. The math is the
chat logprobs' (`token_probs`, `softmax_prob`: a plain softmax of the raw logits).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from llamarpc.proto.errors import NodeUnavailable

from ..sampling import softmax_prob, token_probs
from .forward import forward_micro_batches
from .kv_cells import make_room
from .task import TokenOutput, TokenProb

if TYPE_CHECKING:
    from .engine import Engine

LOGITS_BYTES = 16 << 20     # the logits of one forward here (SmolLM2's 49152 tokens: 85 rows)


def prompt_token_probs(engine: Engine, prompt: Sequence[int], n_probs: int) -> list[TokenOutput | None]:
    """[None, TokenOutput of token 1, ..., of token n-1], each with its n_probs alternatives."""
    if engine.health_error is not None:
        raise NodeUnavailable(engine.health_error, node=None)
    n = len(prompt)
    if n == 0:
        raise ValueError("the prompt is empty")
    if n > engine.n_ctx_slot:
        raise ValueError(f"the prompt has {n} tokens, the slot context is {engine.n_ctx_slot}")
    kv, tok = engine.kv, engine.tokenizer
    make_room(kv, engine.slots, n)
    seq = len(engine.slots)
    ids = np.asarray(prompt, np.int32)
    step = max(1, min(engine.config.n_ubatch, LOGITS_BYTES // (4 * engine.model.n_vocab)))
    out: list[TokenOutput | None] = [None]
    try:
        for a in range(0, n - 1, step):         # the last token's logits predict no prompt token
            b = min(a + step, n - 1)
            logits = forward_micro_batches(engine.model.pipeline, kv, ids[a:b], np.arange(a, b, dtype=np.int32),
                                           np.full(b - a, seq, np.int32), np.ones(b - a, bool), step)
            for r in range(b - a):
                t = int(ids[a + r + 1])
                top_ids, top_p = token_probs(logits[r], n_probs) if n_probs > 0 else ((), ())
                top = [TokenProb(int(i), float(p), tok.token_to_piece(int(i))) for i, p in zip(top_ids, top_p)]
                out.append(TokenOutput(t, softmax_prob(logits[r], t), tok.token_to_piece(t), top))
    finally:
        kv.remove(seq)
    return out
