"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions."""
from __future__ import annotations

import dataclasses

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from ..engine import FinalEvent, PartialEvent
from .chat import parse_messages, template_extra
from .chat_reply import ReasoningStream, split_reply
from .chat_request import chat_prompt
from .checks import encode_chat_off_loop
from .errors import bad_request
from .formats import (
    chat_completion,
    chat_delta,
    chat_final_chunks,
    chat_first_chunk,
    completion_id,
    oai_completion,
    oai_completion_chunk,
)
from .params import Body, check_context, parse_json, task_params
from .routes_native import _collect, _ready, _state, start_completion, stream_events
from .stream import Submission
from .structured import lark_grammar, response_format_grammar, schema_grammar
from .tools import finish, generic_schema, hermes_lark, parse_tools, prepare_messages, shape_reply, stream_deltas, template_tools

router = APIRouter()


@router.get("/v1/models")
@router.get("/models")
async def models(request: Request) -> Response:
    return JSONResponse(_state(request).models_json())


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    st, b, params, sub = await start_completion(request)
    model = b.str("model") or st.settings.model_name
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
async def chat_completions(request: Request) -> Response:
    st = _ready(request)
    assert st.model is not None and st.engine is not None
    body = parse_json(await request.body())
    b = Body(body)
    spec = parse_tools(body, st.chat_template)
    messages = prepare_messages(parse_messages(body.get("messages")), spec, st.chat_template)
    params = task_params(b, st, oai_chat=True)
    grammar = response_format_grammar(body.get("response_format"), st)
    if spec is not None:
        if grammar is not None:
            raise bad_request("'response_format' cannot be combined with 'tools'")
        if not spec.native:
            grammar = schema_grammar("tools", generic_schema(spec), st)
        elif spec.forced:
            grammar = lark_grammar("tools", hermes_lark(spec), st)
    if grammar is not None:
        if params.sampling.grammar is not None:
            raise bad_request("'response_format'/'tools' and 'grammar'/'json_schema' cannot be used together")
        params = dataclasses.replace(params, sampling=dataclasses.replace(params.sampling, grammar=grammar))
    extra = template_extra(body)
    extra.pop("tools", None)
    extra.update(template_tools(spec))
    rendered = chat_prompt(st, body, messages, extra)
    prompt = await encode_chat_off_loop(st.model.tokenizer, rendered.text, st.engine.n_ctx_slot)
    if not prompt:
        raise bad_request("the chat template rendered an empty prompt")
    check_context([prompt], params, st.engine.n_ctx_slot)
    model = b.str("model") or st.settings.model_name
    include_usage = False
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise bad_request("'stream_options' must be an object")
        include_usage = Body(opts).bool("include_usage", False)
    cid = completion_id()
    sub = Submission(st, request, [prompt], params)
    sub.start()
    if not params.stream:
        reply = split_reply(chat_completion((await _collect(sub))[0], cid, model), rendered)
        return JSONResponse(shape_reply(reply, spec) if spec is not None else reply)

    thinking = ReasoningStream(rendered, cid, model, params.post_sampling_probs, hold_content=spec is not None)

    def fmt(ev: PartialEvent | FinalEvent) -> list[dict]:
        if isinstance(ev, FinalEvent):
            if spec is None:
                return thinking.finish() + chat_final_chunks(ev, cid, model, include_usage)
            reasoning = thinking.finish()
            deltas, calls = stream_deltas(thinking.content, spec)      # held back until it parses
            last = chat_final_chunks(ev, cid, model, include_usage)
            last[0]["choices"][0]["finish_reason"] = finish(last[0]["choices"][0]["finish_reason"], calls)
            return reasoning + [chat_delta(cid, model, d) for d in deltas] + last
        return thinking.partial(ev)

    return await stream_events(sub, fmt, [chat_first_chunk(cid, model)], done=True)
