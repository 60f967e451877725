"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions."""
from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from ..engine import FinalEvent, PartialEvent
from .chat_prepare import prepare_chat
from .chat_reply import ReasoningStream, split_reply
from .choices import UsageTail, merge
from .formats import (
    chat_completion,
    chat_delta,
    chat_final_chunks,
    chat_first_chunk,
    completion_id,
)
from .legacy_logprobs import CompletionReply, echo_parts
from .params import n_choices
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
    try:
        echo = await echo_parts(st, r, sub, params.n_probs)
    except BaseException:
        sub.close()
        raise
    out = CompletionReply(echo, params, sub.n, len(sub.tasks), st.model.tokenizer, cid, model)   # type: ignore[union-attr]
    if not params.stream:
        return JSONResponse(out.reply(await _collect(sub)))
    fmt = out.chunks
    return await stream_events(sub, fmt, done=True)


@router.post("/v1/chat/completions")
@router.post("/chat/completions")
async def chat_completions(request: Request, r: ChatRequest) -> Response:
    st = _ready(request)
    req = await prepare_chat(st, r, allow_n=True)
    spec, params, prompt, rendered = req.spec, req.params, req.prompt, req.rendered
    n = n_choices(r, st.settings.n_parallel)
    model = r.model or st.settings.model_name
    include_usage = bool(r.stream_options and r.stream_options.include_usage)
    cid = completion_id()
    sub = Submission(st, request, [prompt], params, n)
    sub.start()
    if not params.stream:
        finals = await _collect(sub)
        replies = [split_reply(chat_completion(f, cid, model), rendered) for f in finals]
        if spec is not None:
            replies = [shape_reply(r, spec) for r in replies]
        return JSONResponse(replies[0] if n == 1 else merge(replies, finals, n))
    tail = UsageTail(n, n, cid, model) if include_usage and n > 1 else None
    thinking = {i: ReasoningStream(rendered, cid, model, params.post_sampling_probs, hold_content=spec is not None,
                                   index=i) for i in range(n)}     # one per choice

    def fmt(ev: PartialEvent | FinalEvent) -> list[dict]:
        think = thinking[ev.index]
        if isinstance(ev, PartialEvent):
            return think.partial(ev)
        reasoning = think.finish()
        last = chat_final_chunks(ev, cid, model, include_usage and tail is None)
        if tail is not None:
            last += tail.add(ev)
        if spec is None:
            return reasoning + last
        deltas, calls = stream_deltas(think.content, spec)      # held back until it parses
        last[0]["choices"][0]["finish_reason"] = finish(last[0]["choices"][0]["finish_reason"], calls)
        return reasoning + [chat_delta(cid, model, d, ev.index) for d in deltas] + last

    return await stream_events(sub, fmt, [chat_first_chunk(cid, model, i) for i in range(n)], done=True)
