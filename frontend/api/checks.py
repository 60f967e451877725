"""Request checks and llama-server details shared by the completion routes, kept beside `params`:

- `check_prompt_bytes`: a prompt whose bytes could not fit a slot is refused before tokenizing it
  (no token covers more than the vocabulary's longest piece);
- `tokenize_off_loop`: tokenization on a worker thread, never on the event loop;
- `generation_settings`: ignore_eos shown as EOG biases, as llama-server shows it;
- `pick_fields`: llama-server's `response_fields`."""
from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool

from ..engine import TaskParams
from ..model.tokenizer import Tokenizer
from .chat import encode_chat
from .errors import bad_request
from .params import tokenize_prompt

_MAX_PIECE: dict[int, int] = {}


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
