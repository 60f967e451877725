"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions."""
from __future__ import annotations

import dataclasses

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from ..engine import FinalEvent, PartialEvent
from .chat import parse_messages, render_prompt, template_extra
from .checks import encode_chat_off_loop
from .choices import UsageTail, merge
from .errors import bad_request
from .formats import (
    chat_completion,
    chat_delta,
    chat_delta_chunk,
    chat_final_chunks,
    chat_first_chunk,
    completion_id,
)
from .legacy_logprobs import CompletionReply, echo_parts
from .params import Body, check_context, n_choices, parse_json, task_params
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
    try:
        echo = await echo_parts(st, b, sub, params.n_probs)
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
async def chat_completions(request: Request) -> Response:
    st = _ready(request)
    assert st.model is not None and st.engine is not None
    body = parse_json(await request.body())
    b = Body(body)
    spec = parse_tools(body, st.chat_template)
    messages = prepare_messages(parse_messages(body.get("messages")), spec, st.chat_template)
    params = task_params(b, st, oai_chat=True, allow_n=True)
    n = n_choices(b, st.settings.n_parallel)
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
    prompt = await encode_chat_off_loop(st.model.tokenizer, render_prompt(st, messages, extra), st.engine.n_ctx_slot)
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
    sub = Submission(st, request, [prompt], params, n)
    sub.start()
    if not params.stream:
        finals = await _collect(sub)
        replies = [chat_completion(f, cid, model) for f in finals]
        if spec is not None:
            replies = [shape_reply(r, spec) for r in replies]
        return JSONResponse(replies[0] if n == 1 else merge(replies, finals, n))
    tail = UsageTail(n, n, cid, model) if include_usage and n > 1 else None

    def fmt(ev: PartialEvent | FinalEvent) -> list[dict]:
        if isinstance(ev, FinalEvent):
            last = chat_final_chunks(ev, cid, model, include_usage and tail is None)
            if tail is not None:
                last += tail.add(ev)
            if spec is None:
                return last
            deltas, calls = stream_deltas(ev.content, spec)      # held back until it parses
            last[0]["choices"][0]["finish_reason"] = finish(last[0]["choices"][0]["finish_reason"], calls)
            return [chat_delta(cid, model, d, ev.index) for d in deltas] + last
        if spec is not None:
            return []
        chunk = chat_delta_chunk(ev, cid, model, params.post_sampling_probs)
        return [chunk] if chunk is not None else []

    return await stream_events(sub, fmt, [chat_first_chunk(cid, model, i) for i in range(n)], done=True)
