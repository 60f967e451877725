"""Request bodies -> engine parameters, with llama.cpp's field names and the server's defaults.

Every field is type-checked; a wrong type or value is an APIError(400) naming the field."""
from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

from ..engine import TaskParams
from ..model.tokenizer import Tokenizer
from ..sampling import SamplingParams, samplers_from_chars, samplers_from_names
from .errors import bad_request
from .state import ServerState
from .structured import completion_grammar


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw) if raw.strip() else None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"Invalid JSON in the request body: {e}") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object")
    return body


class Body:
    """Typed access to a JSON object; `null` counts as absent."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def raw(self, key: str, default: Any = None) -> Any:
        v = self.data.get(key)
        return default if v is None else v

    def int(self, key: str, default: int, lo: int | None = None, hi: int | None = None) -> int:
        v = self.data.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
            raise bad_request(f"'{key}' must be an integer, got {json.dumps(v)}")
        v = int(v)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise bad_request(f"'{key}' must be in [{lo if lo is not None else '-inf'}, "
                              f"{hi if hi is not None else 'inf'}], got {v}")
        return v

    def float(self, key: str, default: float) -> float:
        v = self.data.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise bad_request(f"'{key}' must be a number, got {json.dumps(v)}")
        return float(v)

    def bool(self, key: str, default: bool) -> bool:
        v = self.data.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise bad_request(f"'{key}' must be a boolean, got {json.dumps(v)}")
        return v

    def str(self, key: str, default: str | None = None) -> str | None:
        v = self.data.get(key)
        if v is None:
            return default
        if not isinstance(v, str):
            raise bad_request(f"'{key}' must be a string, got {json.dumps(v)}")
        return v

    def str_list(self, key: str, default: tuple[str, ...] = (), allow_str: bool = False) -> tuple[str, ...]:
        v = self.data.get(key)
        if v is None:
            return default
        if allow_str and isinstance(v, str):
            return (v,)
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise bad_request(f"'{key}' must be an array of strings")
        return tuple(v)


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


def sampling_params(b: Body, defaults: SamplingParams, tok: Tokenizer) -> SamplingParams:
    d = defaults
    samplers = d.samplers
    raw = b.raw("samplers")
    try:
        if isinstance(raw, str):
            samplers = samplers_from_chars(raw)
        elif isinstance(raw, list):
            samplers = samplers_from_names(raw)
        elif raw is not None:
            raise bad_request("'samplers' must be an array of sampler names or a string of sampler characters")
    except ValueError as e:
        raise bad_request(f"'samplers': {e}") from None
    breakers = d.dry_sequence_breakers
    if b.has("dry_sequence_breakers"):
        breakers = b.str_list("dry_sequence_breakers")
        if not breakers:
            raise bad_request("'dry_sequence_breakers' must be a non-empty array of strings")
    seed = b.int("seed", d.seed)
    dry_base = b.float("dry_base", d.dry_base)
    p = SamplingParams(
        temperature=b.float("temperature", d.temperature), top_k=b.int("top_k", d.top_k, 0),
        top_p=b.float("top_p", d.top_p), min_p=b.float("min_p", d.min_p), seed=seed,
        dynatemp_range=b.float("dynatemp_range", d.dynatemp_range),
        dynatemp_exponent=b.float("dynatemp_exponent", d.dynatemp_exponent),
        typical_p=b.float("typical_p", d.typical_p), top_n_sigma=b.float("top_n_sigma", d.top_n_sigma),
        xtc_probability=b.float("xtc_probability", d.xtc_probability),
        xtc_threshold=b.float("xtc_threshold", d.xtc_threshold),
        repeat_last_n=b.int("repeat_last_n", d.repeat_last_n, -1),
        repeat_penalty=b.float("repeat_penalty", d.repeat_penalty),
        presence_penalty=b.float("presence_penalty", d.presence_penalty),
        frequency_penalty=b.float("frequency_penalty", d.frequency_penalty),
        dry_multiplier=b.float("dry_multiplier", d.dry_multiplier),
        dry_base=dry_base if dry_base >= 1.0 else d.dry_base,
        dry_allowed_length=b.int("dry_allowed_length", d.dry_allowed_length, 0),
        dry_penalty_last_n=b.int("dry_penalty_last_n", d.dry_penalty_last_n, -1),
        dry_sequence_breakers=breakers,
        mirostat=b.int("mirostat", d.mirostat, 0, 2), mirostat_tau=b.float("mirostat_tau", d.mirostat_tau),
        mirostat_eta=b.float("mirostat_eta", d.mirostat_eta), min_keep=b.int("min_keep", d.min_keep, 0),
        samplers=samplers,
        logit_bias=_logit_bias(b.raw("logit_bias"), tok) if b.has("logit_bias") else d.logit_bias,
    )
    try:
        p.validate()
    except ValueError as e:
        raise bad_request(str(e)) from None
    return p


MAX_DRAFT = 256     # the most draft tokens a request may ask for per step (speculative.n_max)


def task_params(b: Body, state: ServerState, *, oai_chat: bool = False) -> TaskParams:
    """/completion's options (also read by the OpenAI routes, which add their own names)."""
    s = state.settings
    assert state.model is not None
    tok = state.model.tokenizer
    n_predict = s.n_predict
    for key in ("n_predict", "max_tokens", "max_completion_tokens"):
        if b.has(key):
            n_predict = b.int(key, -1, -1)
            break
    n_probs = b.int("n_probs", 0, 0)
    if not b.has("n_probs"):
        lp = b.raw("logprobs")
        if oai_chat:
            if lp is not None and not isinstance(lp, bool):
                raise bad_request("'logprobs' must be a boolean")
            if lp:
                n_probs = b.int("top_logprobs", 20, 0, 20) or 1
            elif b.has("top_logprobs"):
                raise bad_request("'top_logprobs' requires 'logprobs' to be true")
        elif lp is not None:
            n_probs = 1 if lp is True else (0 if lp is False else b.int("logprobs", 0, 0))
    n = b.int("n", 1, 1) if b.has("n") else b.int("n_cmpl", 1, 1)
    if n != 1:
        raise bad_request("only one completion choice is supported ('n' must be 1)")
    regex = b.str("stop_regex")
    try:
        stop_regex = re.compile(regex) if regex else None
    except re.error as e:
        raise bad_request(f"'stop_regex' is not a valid regular expression: {e}") from None
    id_slot = b.int("id_slot", -1, -1)
    if id_slot >= s.n_parallel:
        raise bad_request(f"'id_slot' {id_slot} does not exist (there are {s.n_parallel} slots)")
    sampling = sampling_params(b, s.sampling, tok)
    sampling = dataclasses.replace(sampling, n_probs=n_probs, grammar=completion_grammar(b.data, state))
    spec: dict[str, Any] = {}
    if state.engine is not None and state.engine.spec is not None:     # llama-server's speculative.* fields
        d = state.engine.spec.params
        n_max = b.int("speculative.n_max", d.n_max, 0, MAX_DRAFT)
        p_min = b.float("speculative.p_min", d.p_min)
        if not 0.0 <= p_min <= 1.0:
            raise bad_request(f"'speculative.p_min' must be in [0, 1], got {p_min}")
        spec = dict(spec_n_max=n_max, spec_n_min=min(b.int("speculative.n_min", d.n_min, 0), n_max), spec_p_min=p_min)
    return TaskParams(**spec,
        sampling=sampling, n_predict=n_predict, stop=tuple(w for w in b.str_list("stop", (), allow_str=True) if w),
        stop_regex=stop_regex, ignore_eos=b.bool("ignore_eos", s.ignore_eos),
        cache_prompt=b.bool("cache_prompt", s.cache_prompt), n_probs=n_probs,
        post_sampling_probs=b.bool("post_sampling_probs", False), return_tokens=b.bool("return_tokens", False),
        stream=b.bool("stream", False), id_slot=id_slot, timings_per_token=b.bool("timings_per_token", False),
        n_keep=b.int("n_keep", 0, -1), model=s.model_name,
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
