"""Request checks and llama-server details shared by the completion routes, kept beside `params`:

- `prepare_body`: `seed` as llama.cpp takes it (any 64-bit integer, kept modulo 2^32 like its
  uint32 seed; -1 and 0xFFFFFFFF random), `n_probs` / `logprobs` capped at `MAX_N_PROBS`, and a
  JSON object prompt (``{"prompt_string": ...}``) read as its text;
- `check_prompt_bytes`: a prompt whose bytes could not fit a slot is refused before tokenizing it
  (no token covers more than the vocabulary's longest piece);
- `tokenize_off_loop`: tokenization on a worker thread, never on the event loop;
- `generation_settings`: ignore_eos shown as EOG biases, as llama-server shows it;
- `pick_fields`: llama-server's `response_fields`."""
from __future__ import annotations

import json
from typing import Any

from starlette.concurrency import run_in_threadpool

from ..engine import TaskParams
from ..model.tokenizer import Tokenizer
from .chat import encode_chat
from .errors import bad_request
from .params import tokenize_prompt

MAX_N_PROBS = 100       # alternatives reported per token, at most (the whole vocabulary was 234 MB for 50 tokens)
_MAX_PIECE: dict[int, int] = {}


def _seed(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise bad_request(f"'seed' must be an integer, got {json.dumps(v)}")
    v = int(v)
    if not -(2**63) <= v < 2**64:
        raise bad_request(f"'seed' {v} is out of range: llama.cpp takes a 64-bit integer and keeps it modulo 2^32 "
                          "(-1 or 4294967295 = random)")
    v &= 0xFFFFFFFF
    return -1 if v == 0xFFFFFFFF else v


def _prompt(p: Any) -> Any:
    if not isinstance(p, dict):
        return p
    if p.get("multimodal_data"):
        raise bad_request("'prompt'.multimodal_data: this server has no multimodal support")
    text = p.get("prompt_string")
    if not isinstance(text, str):
        raise bad_request("a JSON object prompt must have a string 'prompt_string'")
    return text


def prepare_body(body: dict[str, Any]) -> dict[str, Any]:
    """A copy of a completion request with llama.cpp's readings applied (see the module docstring)."""
    body = dict(body)
    if body.get("seed") is not None:
        body["seed"] = _seed(body["seed"])
    for key in ("n_probs", "logprobs"):
        v = body.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > MAX_N_PROBS:
            body[key] = MAX_N_PROBS
    p = body.get("prompt")
    if isinstance(p, dict):
        body["prompt"] = _prompt(p)
    elif isinstance(p, list) and any(isinstance(x, dict) for x in p):
        body["prompt"] = [_prompt(x) for x in p]
    return body


def max_piece_bytes(tok: Tokenizer) -> int:
    key = id(tok)
    if key not in _MAX_PIECE:
        _MAX_PIECE[key] = max(1, max(len(tok.token_to_piece(i)) for i in range(tok.n_vocab)))
    return _MAX_PIECE[key]


def check_prompt_bytes(prompt: Any, tok: Tokenizer, n_ctx_slot: int) -> None:
    """Refuse, from its length alone, a prompt that cannot fit (a factor 2 of slack for normalizers)."""
    texts = [prompt] if isinstance(prompt, str) else [x for x in prompt if isinstance(x, str)] \
        if isinstance(prompt, list) else []
    n_ids = len(prompt) if isinstance(prompt, list) else 0
    limit = 2 * max_piece_bytes(tok) * n_ctx_slot
    for t in texts:
        if len(t) > limit or len(t.encode("utf-8", "surrogatepass")) > limit:
            raise bad_request(f"the request exceeds the available context size: a prompt of {len(t)} characters "
                              f"cannot fit the context of a slot ({n_ctx_slot} tokens)")
    if n_ids > 4 * n_ctx_slot:
        raise bad_request(f"the request exceeds the available context size: {n_ids} prompt elements cannot fit "
                          f"the context of a slot ({n_ctx_slot} tokens)")


async def tokenize_off_loop(prompt: Any, tok: Tokenizer, n_ctx_slot: int) -> list[list[int]]:
    check_prompt_bytes(prompt, tok, n_ctx_slot)
    return await run_in_threadpool(tokenize_prompt, prompt, tok)


async def encode_chat_off_loop(tok: Tokenizer, text: str, n_ctx_slot: int) -> list[int]:
    check_prompt_bytes(text, tok, n_ctx_slot)
    return await run_in_threadpool(encode_chat, tok, text)


def generation_settings(params: TaskParams, tok: Tokenizer) -> dict:
    """`params.to_json()` with ignore_eos shown as llama-server shows it: a false bias per EOG token."""
    out = params.to_json()
    if params.ignore_eos:
        have = {e["token"] for e in out["logit_bias"]}
        out["logit_bias"] = out["logit_bias"] + [{"bias": False, "token": t} for t in sorted(tok.eog_ids)
                                                 if t not in have]
    return out


def pick_fields(out: dict, fields: Any) -> dict:
    """llama-server's `response_fields`: only these (a/b reads out["a"]["b"], keyed "a/b"); missing ones skipped."""
    if not fields:
        return out
    if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
        raise bad_request("'response_fields' must be an array of strings")
    picked: dict[str, Any] = {}
    for path in fields:
        cur: Any = out
        for part in path.split("/"):
            if not isinstance(cur, dict) or part not in cur:
                break
            cur = cur[part]
        else:
            picked[path] = cur
    return picked
