"""Validated request models (`schemas.py`) -> engine parameters, with the server's defaults.

The models have checked each field's type and range; what is left here depends on the server:
the vocabulary (logit_bias, token ids), the slot count, the sampler names."""
from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

from ..engine import TaskParams
from ..model.lora import parse_scales
from ..model.tokenizer import Tokenizer
from ..sampling import SamplingParams, samplers_from_chars, samplers_from_names
from .errors import bad_request
from .schemas import CompletionOptions, SamplingFields
from .state import ServerState
from .structured import completion_grammar


def _logit_bias(value: Any, tok: Tokenizer) -> tuple[tuple[int, float], ...]:
    """[[id or "text", bias or false], ...] or {"id or text": bias or false}; false bans."""
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = []
        for el in value:
            if not isinstance(el, list) or len(el) != 2:
                raise bad_request("'logit_bias' entries must be [token, bias] pairs")
            items.append((el[0], el[1]))
    else:
        raise bad_request("'logit_bias' must be an array of [token, bias] pairs or an object")
    out: list[tuple[int, float]] = []
    for key, b in items:
        if b is False:
            bias = -math.inf
        elif isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b):
            raise bad_request(f"'logit_bias' bias must be a number or false, got {json.dumps(b)}")
        else:
            bias = float(b)
        if isinstance(key, str) and re.fullmatch(r"-?\d+", key.strip()):
            key = int(key)
        if isinstance(key, int) and not isinstance(key, bool):
            if not 0 <= key < tok.n_vocab:
                raise bad_request(f"'logit_bias' token id {key} is out of range [0, {tok.n_vocab})")
            out.append((key, bias))
        elif isinstance(key, str):
            out += [(t, bias) for t in tok.encode(key, add_special=False, parse_special=False)]
        else:
            raise bad_request(f"'logit_bias' token must be an id or a string, got {json.dumps(key)}")
    return tuple(out)


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def sampling_params(r: SamplingFields, defaults: SamplingParams, tok: Tokenizer) -> SamplingParams:
    d = defaults
    samplers = d.samplers
    try:
        if isinstance(r.samplers, str):
            samplers = samplers_from_chars(r.samplers)
        elif isinstance(r.samplers, list):
            samplers = samplers_from_names(r.samplers)
    except ValueError as e:
        raise bad_request(f"'samplers': {e}") from None
    dry_base = _or(r.dry_base, d.dry_base)
    p = SamplingParams(
        temperature=_or(r.temperature, d.temperature), top_k=_or(r.top_k, d.top_k),
        top_p=_or(r.top_p, d.top_p), min_p=_or(r.min_p, d.min_p), seed=_or(r.seed, d.seed),
        dynatemp_range=_or(r.dynatemp_range, d.dynatemp_range),
        dynatemp_exponent=_or(r.dynatemp_exponent, d.dynatemp_exponent),
        typical_p=_or(r.typical_p, d.typical_p), top_n_sigma=_or(r.top_n_sigma, d.top_n_sigma),
        xtc_probability=_or(r.xtc_probability, d.xtc_probability),
        xtc_threshold=_or(r.xtc_threshold, d.xtc_threshold),
        repeat_last_n=_or(r.repeat_last_n, d.repeat_last_n),
        repeat_penalty=_or(r.repeat_penalty, d.repeat_penalty),
        presence_penalty=_or(r.presence_penalty, d.presence_penalty),
        frequency_penalty=_or(r.frequency_penalty, d.frequency_penalty),
        dry_multiplier=_or(r.dry_multiplier, d.dry_multiplier),
        dry_base=dry_base if dry_base >= 1.0 else d.dry_base,
        dry_allowed_length=_or(r.dry_allowed_length, d.dry_allowed_length),
        dry_penalty_last_n=_or(r.dry_penalty_last_n, d.dry_penalty_last_n),
        dry_sequence_breakers=tuple(_or(r.dry_sequence_breakers, d.dry_sequence_breakers)),
        mirostat=_or(r.mirostat, d.mirostat), mirostat_tau=_or(r.mirostat_tau, d.mirostat_tau),
        mirostat_eta=_or(r.mirostat_eta, d.mirostat_eta), min_keep=_or(r.min_keep, d.min_keep),
        samplers=samplers,
        logit_bias=_logit_bias(r.logit_bias, tok) if r.logit_bias is not None else d.logit_bias,
    )
    try:
        p.validate()
    except ValueError as e:
        raise bad_request(str(e)) from None
    return p


def _n_probs(r: CompletionOptions, oai_chat: bool) -> int:
    """`n_probs`, else OpenAI's `logprobs` (chat: a boolean with `top_logprobs`; completions: a count)."""
    if r.n_probs is not None:
        return r.n_probs
    lp = getattr(r, "logprobs", None)
    if oai_chat:
        top = getattr(r, "top_logprobs", None)
        if lp:
            return _or(top, 20) or 1
        if top is not None:
            raise bad_request("'top_logprobs' requires 'logprobs' to be true")
        return 0
    if lp is None or lp is False:
        return 0
    return 1 if lp is True else lp


def n_choices(r: CompletionOptions, n_parallel: int) -> int:
    """`n` (OpenAI) or `n_cmpl` (llama.cpp): choices per prompt, each in a slot of its own."""
    key = "n" if r.n is not None else "n_cmpl"
    n = _or(r.n, _or(r.n_cmpl, 1))
    if n > n_parallel:
        raise bad_request(f"'{key}' is {n}, more than the number of slots ({n_parallel}); "
                          f"start the server with a larger -np/--parallel")
    return n


def task_params(r: CompletionOptions, state: ServerState, *, oai_chat: bool = False,
                allow_n: bool = False) -> TaskParams:
    """The generating endpoints' options (the OpenAI routes' own names included) -> TaskParams."""
    s = state.settings
    assert state.model is not None
    tok = state.model.tokenizer
    n_predict = next((v for v in (r.n_predict, r.max_tokens, r.max_completion_tokens) if v is not None),
                     s.n_predict)
    n_probs = _n_probs(r, oai_chat)
    if n_choices(r, s.n_parallel) != 1 and not allow_n:
        raise bad_request("only one completion choice is supported here ('n' must be 1)")
    try:
        stop_regex = re.compile(r.stop_regex) if r.stop_regex else None
    except re.error as e:
        raise bad_request(f"'stop_regex' is not a valid regular expression: {e}") from None
    id_slot = _or(r.id_slot, -1)
    if id_slot >= s.n_parallel:
        raise bad_request(f"'id_slot' {id_slot} does not exist (there are {s.n_parallel} slots)")
    stop = (r.stop,) if isinstance(r.stop, str) else tuple(r.stop or ())
    sampling = sampling_params(r, s.sampling, tok)
    sampling = dataclasses.replace(sampling, n_probs=n_probs, grammar=completion_grammar(r.grammar, r.json_schema, state))
    adapters = state.model.adapters
    try:    # the request's own adapter scales, else the global ones as they are now
        lora = parse_scales(r.lora, adapters) if r.lora is not None else tuple(a.scale for a in adapters)
    except ValueError as e:
        raise bad_request(str(e)) from None
    spec: dict[str, Any] = {}
    if state.engine is not None and state.engine.spec is not None:     # llama-server's speculative.* fields
        d = state.engine.spec.params
        n_max = _or(r.spec_n_max, d.n_max)
        spec = dict(spec_n_max=n_max, spec_n_min=min(_or(r.spec_n_min, d.n_min), n_max),
                    spec_p_min=_or(r.spec_p_min, d.p_min))
    return TaskParams(
        **spec, sampling=sampling, n_predict=n_predict, stop=tuple(w for w in stop if w),
        stop_regex=stop_regex, ignore_eos=_or(r.ignore_eos, s.ignore_eos),
        cache_prompt=_or(r.cache_prompt, s.cache_prompt), n_probs=n_probs,
        post_sampling_probs=bool(r.post_sampling_probs), return_tokens=bool(r.return_tokens),
        stream=bool(r.stream), id_slot=id_slot, timings_per_token=bool(r.timings_per_token),
        n_keep=_or(r.n_keep, 0), n_discard=_or(r.n_discard, 0), model=s.model_name, lora=lora,
    )


def tokenize_prompt(prompt: Any, tok: Tokenizer, add_special: bool = True) -> list[list[int]]:
    """llama.cpp's prompt shapes: "text", [ids], [ids and "text" mixed], or an array of those
    (several prompts). Strings get BOS (when the model adds one) only at the very start."""
    def one(p: Any) -> list[int]:
        if isinstance(p, str):
            return tok.encode(p, add_special=add_special, parse_special=True)
        if isinstance(p, list):
            out: list[int] = []
            for i, el in enumerate(p):
                if isinstance(el, str):
                    out += tok.encode(el, add_special=add_special and i == 0, parse_special=True)
                elif isinstance(el, int) and not isinstance(el, bool):
                    if not 0 <= el < tok.n_vocab:
                        raise bad_request(f"token id {el} in the prompt is out of range [0, {tok.n_vocab})")
                    out.append(el)
                else:
                    raise bad_request("a prompt array may hold only token ids and strings")
            return out
        raise bad_request("'prompt' must be a string, an array of token ids and strings, or an array of prompts")

    if prompt is None:
        raise bad_request("'prompt' is required")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt) \
            and not (len(prompt) == 1 and isinstance(prompt[0], str)):
        prompts = [one(p) for p in prompt]      # several prompts
    else:
        prompts = [one(prompt)]                 # a string, token ids, or ids and strings mixed
    for p in prompts:
        if not p:
            raise bad_request("the prompt is empty")
    return prompts


def check_context(prompts: list[list[int]], params: TaskParams, n_ctx_slot: int) -> None:
    for p in prompts:
        if len(p) >= n_ctx_slot:
            raise bad_request(f"the request exceeds the available context size: the prompt has {len(p)} tokens, "
                              f"the context of a slot is {n_ctx_slot}")
    # prompt + n_predict beyond the slot runs, as in llama-server, and stops with finish_reason "length"
