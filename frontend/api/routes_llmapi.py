"""llm-api's routes: form-encoded (or query-string) requests in, plain text streamed out.

POST/GET /predict: prompt (required), stopRegex, temperature.
POST/GET /chat: messages (repeated, alternating user/assistant, the last from the user), stopRegex,
temperature; the prompt is built with the chat template.
Errors before generation starts are a status code with the description in plain text; an error
during generation closes the connection (the status was already 200), as llm-api does."""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import AsyncIterator
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse

from ..engine import ErrorEvent, PartialEvent, TaskParams
from .chat import encode_chat, render_prompt
from .errors import APIError
from .routes_native import _first, _state
from .state import ServerState
from .stream import ClientGone, Submission

router = APIRouter()


class _StreamBroken(Exception):
    """Raised inside a running plain-text stream: the server closes the connection."""


async def _form(request: Request) -> dict[str, list[str]]:
    fields = parse_qs(request.url.query, keep_blank_values=True)
    if request.method == "POST":
        ctype = request.headers.get("content-type", "")
        raw = await request.body()
        if raw and "multipart/" in ctype:
            raise APIError(400, "requests must be x-www-form-urlencoded")
        for k, v in parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True).items():
            fields.setdefault(k, []).extend(v)
    return fields


def _params(st: ServerState, fields: dict[str, list[str]]) -> TaskParams:
    s = st.settings
    sampling = s.sampling
    if "temperature" in fields:
        try:
            t = float(fields["temperature"][-1])
        except ValueError:
            raise APIError(400, "temperature must be a number") from None
        if not math.isfinite(t):
            raise APIError(400, "temperature must be a finite number")
        sampling = dataclasses.replace(sampling, temperature=t)
    regex = None
    if fields.get("stopRegex", [""])[-1]:
        try:
            regex = re.compile(fields["stopRegex"][-1])
        except re.error as e:
            raise APIError(400, f"stopRegex is not a valid regular expression: {e}") from None
    return TaskParams(sampling=sampling, n_predict=s.n_predict, stop_regex=regex, ignore_eos=s.ignore_eos,
                      cache_prompt=s.cache_prompt, stream=True, model=s.model_name)


async def _plain_stream(request: Request, st: ServerState, prompt: list[int], params: TaskParams) -> Response:
    assert st.engine is not None
    if len(prompt) >= st.engine.n_ctx_slot:
        raise APIError(400, f"the prompt has {len(prompt)} tokens, the context of a slot is {st.engine.n_ctx_slot}")
    sub = Submission(st, request, [prompt], params)
    sub.start()
    first = await _first(sub)
    if isinstance(first, ErrorEvent):
        raise APIError(first.code, first.message, first.type)
    sub.stop_watching()

    async def gen() -> AsyncIterator[str]:
        ev = first
        try:
            while ev is not None:
                if isinstance(ev, ErrorEvent):
                    raise _StreamBroken(ev.message)
                if isinstance(ev, PartialEvent) and ev.text:
                    yield ev.text
                ev = await sub.next()
        except APIError as e:
            raise _StreamBroken(e.message) from None
        except ClientGone:
            return
        finally:
            sub.close()

    return StreamingResponse(gen(), media_type="text/plain; charset=utf-8")


def _ready_or_text(request: Request) -> ServerState:
    st = _state(request)
    if not st.ready:
        raise APIError(503, "Loading model")
    return st


@router.get("/predict", operation_id="llmapi_predict_get")
@router.post("/predict", operation_id="llmapi_predict_post")
async def predict(request: Request) -> Response:
    try:
        st = _ready_or_text(request)
        assert st.model is not None
        fields = await _form(request)
        prompt = fields.get("prompt", [""])[-1]
        if not prompt:
            raise APIError(400, "prompt is required")
        ids = st.model.tokenizer.encode(prompt, add_special=True, parse_special=True)
        return await _plain_stream(request, st, ids, _params(st, fields))
    except APIError as e:
        return PlainTextResponse(e.message + "\n", status_code=e.code)


@router.get("/chat", operation_id="llmapi_chat_get")
@router.post("/chat", operation_id="llmapi_chat_post")
async def chat(request: Request) -> Response:
    try:
        st = _ready_or_text(request)
        assert st.model is not None
        fields = await _form(request)
        texts = fields.get("messages", [])
        if not texts:
            raise APIError(400, "messages is required")
        if len(texts) % 2 == 0:
            raise APIError(400, "messages must alternate user/assistant and end with a user message")
        messages = [{"role": "system", "content": st.settings.system_prompt}] if st.settings.system_prompt else []
        messages += [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]
        ids = encode_chat(st.model.tokenizer, render_prompt(st, messages))
        return await _plain_stream(request, st, ids, _params(st, fields))
    except APIError as e:
        return PlainTextResponse(e.message + "\n", status_code=e.code)
