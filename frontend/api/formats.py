"""Engine events -> llama.cpp's response JSON (native and OpenAI-compatible)."""
from __future__ import annotations

import secrets
import string
import time
from typing import Any

from ..engine import STOP_LIMIT, FinalEvent, PartialEvent, TokenOutput, TokenProb

BUILD_INFO = "llamarpc"
_ALNUM = string.ascii_letters + string.digits
_LOWEST = -3.4028234663852886e38   # llama.cpp reports log(0) as the lowest float


def completion_id(prefix: str = "chatcmpl-") -> str:
    return prefix + "".join(secrets.choice(_ALNUM) for _ in range(32))


def _text(piece: bytes) -> str:
    return piece.decode("utf-8", "ignore")


def _logp(p: float) -> float:
    import math
    return math.log(p) if p > 0 else _LOWEST


def _prob_json(t: TokenProb, post: bool) -> dict:
    return {"id": t.id, "token": _text(t.piece), "bytes": list(t.piece),
            ("prob" if post else "logprob"): t.prob if post else _logp(t.prob)}


def probs_json(probs: list[TokenOutput], post: bool) -> list[dict]:
    return [{"id": o.id, "token": _text(o.piece), "bytes": list(o.piece),
             ("prob" if post else "logprob"): o.prob if post else _logp(o.prob),
             ("top_probs" if post else "top_logprobs"): [_prob_json(t, post) for t in o.top]} for o in probs]


def finish_reason(stop_type: str) -> str:
    return "length" if stop_type == STOP_LIMIT else "stop"


def usage(f: FinalEvent) -> dict:
    return {"completion_tokens": f.n_decoded, "prompt_tokens": f.n_prompt, "total_tokens": f.n_decoded + f.n_prompt,
            "prompt_tokens_details": {"cached_tokens": f.timings.cache_n}}


# -- /completion ------------------------------------------------------------------------------------
def native_partial(e: PartialEvent, post: bool) -> dict:
    out: dict[str, Any] = {"index": e.index, "content": e.text, "tokens": e.tokens, "stop": False,
                           "id_slot": e.id_slot, "tokens_predicted": e.n_decoded, "tokens_evaluated": e.n_prompt}
    if e.timings is not None:
        out["timings"] = e.timings.to_json()
    if e.probs:
        out["completion_probabilities"] = probs_json(e.probs, post)
    return out


def native_final(f: FinalEvent, n_ctx: int, stream: bool, prompt_text: str = "") -> dict:
    p = f.params
    settings = p.to_json()
    settings["n_ctx"] = n_ctx
    settings["model"] = p.model
    out: dict[str, Any] = {
        "index": f.index, "content": "" if stream else f.content,
        "tokens": [] if stream or not p.return_tokens else f.tokens,
        "id_slot": f.id_slot, "stop": True, "model": p.model, "tokens_predicted": f.n_decoded,
        "tokens_evaluated": f.n_prompt, "generation_settings": settings, "prompt": prompt_text,
        "has_new_line": f.has_new_line, "truncated": f.truncated, "stop_type": f.stop_type,
        "stopped_eos": f.stop_type == "eos", "stopped_word": f.stop_type == "word",
        "stopped_limit": f.stop_type == "limit", "stopping_word": f.stopping_word,
        "tokens_cached": f.n_cached, "timings": f.timings.to_json(),
    }
    if not stream and f.probs:
        out["completion_probabilities"] = probs_json(f.probs, p.post_sampling_probs)
    return out


# -- /v1/completions --------------------------------------------------------------------------------
def _oai_logprobs(probs: list[TokenOutput], post: bool) -> dict | None:
    return {"content": probs_json(probs, post)} if probs else None


def oai_completion_chunk(e: PartialEvent | None, f: FinalEvent | None, cid: str, model: str, post: bool) -> dict:
    created = int(time.time())
    if f is not None:
        choice = {"text": "", "index": f.index, "logprobs": None, "finish_reason": finish_reason(f.stop_type)}
        out = {"choices": [choice], "created": created, "model": model, "system_fingerprint": BUILD_INFO,
               "object": "text_completion", "id": cid, "usage": usage(f), "timings": f.timings.to_json()}
        return out
    assert e is not None
    choice = {"text": e.text, "index": e.index, "logprobs": _oai_logprobs(e.probs, post), "finish_reason": None}
    return {"choices": [choice], "created": created, "model": model, "system_fingerprint": BUILD_INFO,
            "object": "text_completion", "id": cid}


def oai_completion(finals: list[FinalEvent], cid: str, model: str) -> dict:
    choices = [{"text": f.content, "index": f.index, "logprobs": _oai_logprobs(f.probs, f.params.post_sampling_probs),
                "finish_reason": finish_reason(f.stop_type)} for f in finals]
    n_dec = sum(f.n_decoded for f in finals)
    n_prompt = sum(f.n_prompt for f in finals)
    return {"choices": choices, "created": int(time.time()), "model": model, "system_fingerprint": BUILD_INFO,
            "object": "text_completion",
            "usage": {"completion_tokens": n_dec, "prompt_tokens": n_prompt, "total_tokens": n_dec + n_prompt},
            "id": cid, "timings": finals[0].timings.to_json()}


# -- /v1/chat/completions ---------------------------------------------------------------------------
def _chunk(cid: str, model: str, choices: list[dict]) -> dict:
    return {"choices": choices, "created": int(time.time()), "id": cid, "model": model,
            "system_fingerprint": BUILD_INFO, "object": "chat.completion.chunk"}


def chat_first_chunk(cid: str, model: str, index: int = 0) -> dict:
    return _chunk(cid, model, [{"finish_reason": None, "index": index,
                                "delta": {"role": "assistant", "content": None}}])


def chat_delta(cid: str, model: str, delta: dict, index: int = 0) -> dict:
    return _chunk(cid, model, [{"finish_reason": None, "index": index, "delta": delta}])


def chat_final_chunks(f: FinalEvent, cid: str, model: str, include_usage: bool) -> list[dict]:
    last = _chunk(cid, model, [{"finish_reason": finish_reason(f.stop_type), "index": f.index, "delta": {}}])
    out = [last]
    if include_usage:
        u = _chunk(cid, model, [])
        u["usage"] = usage(f)
        out.append(u)
    out[-1]["timings"] = f.timings.to_json()
    return out


def chat_completion(f: FinalEvent, cid: str, model: str) -> dict:
    choice: dict[str, Any] = {"finish_reason": finish_reason(f.stop_type), "index": f.index,
                              "message": {"role": "assistant", "content": f.content}}
    if f.probs:
        choice["logprobs"] = {"content": probs_json(f.probs, f.params.post_sampling_probs)}
    return {"choices": [choice], "created": int(time.time()), "model": model, "system_fingerprint": BUILD_INFO,
            "object": "chat.completion", "usage": usage(f), "id": cid, "timings": f.timings.to_json()}
