"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions."""
from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from ..engine import FinalEvent, PartialEvent
from .chatreq import prepare_chat
from .formats import (
    chat_completion,
    chat_delta,
    chat_delta_chunk,
    chat_final_chunks,
    chat_first_chunk,
    completion_id,
    oai_completion,
    oai_completion_chunk,
)
from .routes_native import _collect, _ready, _state, start_completion, stream_events
from .schemas import ChatRequest, CompletionRequest
from .stream import Submission
from .tools import finish, shape_reply, stream_deltas

router = APIRouter()


@router.get("/v1/models")
@router.get("/models")
async def models(request: Request) -> Response:
    return JSONResponse(_state(request).models_json())


@router.post("/v1/completions")
async def completions(request: Request, r: CompletionRequest) -> Response:
    st, params, sub = await start_completion(request, r)
    model = r.model or st.settings.model_name
    cid = completion_id()
    if not params.stream:
        return JSONResponse(oai_completion(await _collect(sub), cid, model))

    def fmt(ev: PartialEvent | FinalEvent) -> list[dict]:
        if isinstance(ev, FinalEvent):
            return [oai_completion_chunk(None, ev, cid, model, params.post_sampling_probs)]
        if not ev.text and not ev.probs:
            return []
        return [oai_completion_chunk(ev, None, cid, model, params.post_sampling_probs)]

    return await stream_events(sub, fmt, done=True)


@router.post("/v1/chat/completions")
@router.post("/chat/completions")
async def chat_completions(request: Request, r: ChatRequest) -> Response:
    st = _ready(request)
    req = await prepare_chat(st, r)
    spec, params, prompt = req.spec, req.params, req.prompt
    model = r.model or st.settings.model_name
    include_usage = bool(r.stream_options and r.stream_options.include_usage)
    cid = completion_id()
    sub = Submission(st, request, [prompt], params)
    sub.start()
    if not params.stream:
        reply = chat_completion((await _collect(sub))[0], cid, model)
        return JSONResponse(shape_reply(reply, spec) if spec is not None else reply)

    def fmt(ev: PartialEvent | FinalEvent) -> list[dict]:
        if isinstance(ev, FinalEvent):
            if spec is None:
                return chat_final_chunks(ev, cid, model, include_usage)
            deltas, calls = stream_deltas(ev.content, spec)      # held back until it parses
            last = chat_final_chunks(ev, cid, model, include_usage)
            last[0]["choices"][0]["finish_reason"] = finish(last[0]["choices"][0]["finish_reason"], calls)
            return [chat_delta(cid, model, d) for d in deltas] + last
        if spec is not None:
            return []
        chunk = chat_delta_chunk(ev, cid, model, params.post_sampling_probs)
        return [chunk] if chunk is not None else []

    return await stream_events(sub, fmt, [chat_first_chunk(cid, model)], done=True)
