"""Sampling: llama.cpp's sampler chain over numpy logits, sampler for sampler, with its defaults.
`params` holds SamplingParams and the sampler names; `cand` the candidate set (a leaf every step
works on); `steps` the stateless steps (top_k, top_p, min_p, typical, XTC, temperature, ...) and
the seeded draw; `dry` the DRY penalty; `sampler` the chain in one place (logit_bias, the
`samplers` order, penalties and mirostat, which keep state per request). The engine makes one
Sampler per request; nothing here knows a slot, a request or the HTTP API."""
from .cand import Cand
from .params import (
    DEFAULT_DRY_BREAKERS,
    DEFAULT_SAMPLERS,
    LLAMA_DEFAULT_SEED,
    SamplingParams,
    samplers_from_chars,
    samplers_from_names,
)
from .sampler import Sampled, Sampler, softmax_prob, token_probs

__all__ = ["Cand", "DEFAULT_DRY_BREAKERS", "DEFAULT_SAMPLERS", "LLAMA_DEFAULT_SEED", "SamplingParams",
           "samplers_from_chars", "samplers_from_names", "Sampled", "Sampler", "softmax_prob", "token_probs"]
