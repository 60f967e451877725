"""llama.cpp's own routes: /health, /props, /slots, /metrics, /completion, /tokenize,
/detokenize, /apply-template."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..engine import ErrorEvent, FinalEvent, PartialEvent, TaskParams
from .chat import parse_messages, template_extra
from .chat_request import chat_prompt
from .checks import generation_settings, pick_fields, tokenize_off_loop
from .errors import APIError, bad_request, error_body, error_response
from .formats import BUILD_INFO, native_final, native_partial
from .metrics import CONTENT_TYPE
from .params import check_context, n_choices, task_params
from .schemas import ApplyTemplateRequest, CompletionRequest, DetokenizeRequest, SlotActionRequest, TokenizeRequest
from .slot_actions import slot_action
from .state import ServerState
from .stream import SSE_DONE, SSE_HEADERS, ClientGone, Submission, sse


def _state(request: Request) -> ServerState:
    return request.app.state.llamarpc


def _ready(request: Request) -> ServerState:
    st = _state(request)
    if not st.ready:
        raise APIError(503, "Loading model", "unavailable_error")
    return st


router = APIRouter()


@router.get("/health")
@router.get("/v1/health")
async def health(request: Request) -> Response:
    st = _state(request)
    if not st.ready:
        return error_response(503, st.load_error or "Loading model", "unavailable_error")
    assert st.engine is not None
    nodes = st.engine.node_states()     # each node: name, state (attached/lost/removed), layers
    if st.engine.health_error is not None:
        return JSONResponse({**error_body(503, st.engine.health_error, "unavailable_error"), "nodes": nodes}, 503)
    return JSONResponse({"status": "ok", "nodes": nodes})


@router.get("/props")
async def props(request: Request) -> Response:
    st = _ready(request)
    assert st.engine is not None and st.model is not None
    slot = _slot_json(st, st.engine.slots[0])
    slot["params"] = _default_params(st)
    slot["prompt"] = ""
    return JSONResponse({
        "default_generation_settings": slot, "total_slots": len(st.engine.slots),
        "model_path": st.settings.model_path, "model_alias": st.settings.model_name,
        "chat_template": st.chat_template, "chat_template_caps": {}, "modalities": {"vision": False, "audio": False},
        "build_info": BUILD_INFO, "is_sleeping": False,
        "bos_token": st.model.tokenizer.token_text(st.model.tokenizer.bos_id),
        "eos_token": st.model.tokenizer.token_text(st.model.tokenizer.eos_id),
    })


def _default_params(st: ServerState) -> dict:
    from ..engine import TaskParams
    s = st.settings
    assert st.model is not None
    sp = st.engine.spec.params if st.engine is not None and st.engine.spec is not None else None
    spec = dict(spec_n_max=sp.n_max, spec_n_min=sp.n_min, spec_p_min=sp.p_min) if sp is not None else {}
    return generation_settings(TaskParams(sampling=s.sampling, n_predict=s.n_predict, ignore_eos=s.ignore_eos,
                                          cache_prompt=s.cache_prompt, model=s.model_name, **spec),
                               st.model.tokenizer)


def _slot_json(st: ServerState, slot) -> dict:  # noqa: ANN001 - engine.Slot
    """llama-server's /slots entry: `next_token` a list (one entry per sequence), ignore_eos as EOG biases."""
    out = slot.to_json()
    if isinstance(out.get("next_token"), dict):
        out["next_token"] = [out["next_token"]]
    if slot.task is not None and st.model is not None:
        out["params"] = generation_settings(slot.task.params, st.model.tokenizer)
    return out


@router.get("/slots")
async def slots(request: Request) -> Response:
    st = _state(request)
    if not st.settings.slots:
        return error_response(501, "This server does not support slots endpoint. Start it with `--slots`",
                              "not_supported_error")
    st = _ready(request)
    assert st.engine is not None
    if request.query_params.get("fail_on_no_slot") in ("1", "true") and all(s.busy for s in st.engine.slots):
        return error_response(503, "no slot available", "unavailable_error")
    return JSONResponse([_slot_json(st, s) for s in st.engine.slots])


@router.post("/slots/{id_slot}")
async def slots_action(request: Request, id_slot: str, r: SlotActionRequest | None = None) -> Response:
    """save / restore / erase a slot's KV cache (slot_actions.py)."""
    return await slot_action(request, _state(request), id_slot, r)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    st = _state(request)
    if not st.settings.metrics:
        return error_response(501, "This server does not support metrics endpoint. Start it with `--metrics`",
                              "not_supported_error")
    st = _ready(request)
    assert st.engine is not None
    return Response(st.observer.render(), media_type=CONTENT_TYPE,
                    headers={"Process-Start-Time-Unix": str(int(st.start_time))})


async def start_completion(request: Request, r: CompletionRequest) -> tuple[ServerState, TaskParams, Submission]:
    """The shared start of /completion and /v1/completions: parameters, tokenize, check, enqueue."""
    st = _ready(request)
    assert st.model is not None and st.engine is not None
    params = task_params(r, st, allow_n=True)
    n = n_choices(r, st.settings.n_parallel)
    if r.prompt is None:
        raise bad_request("'prompt' is required")
    prompts = await tokenize_off_loop(r.prompt, st.model.tokenizer, st.engine.n_ctx_slot)
    check_context(prompts, params, st.engine.n_ctx_slot)
    sub = Submission(st, request, prompts, params, n)
    sub.start()
    return st, params, sub


@router.post("/completion")
@router.post("/completions")
async def completion(request: Request, r: CompletionRequest) -> Response:
    st, params, sub = await start_completion(request, r)
    assert st.engine is not None and st.model is not None
    tok = st.model.tokenizer
    fields = r.response_fields

    def final(f: FinalEvent, stream: bool) -> dict:
        out = native_final(f, st.engine.n_ctx_slot, stream, _detok(st, f.prompt))  # type: ignore[union-attr]
        out["generation_settings"]["logit_bias"] = generation_settings(f.params, tok)["logit_bias"]
        return pick_fields(out, fields)

    if not params.stream:
        out = [final(f, False) for f in await _collect(sub)]
        return JSONResponse(out[0] if len(out) == 1 else out)
    progress = bool(r.return_progress)
    t0 = time.monotonic()
    reported: set[int] = set()

    def fmt(ev: PartialEvent | FinalEvent) -> list[dict]:
        head = []
        if progress and ev.index not in reported:   # llama-server's prompt_progress, once the prompt is in
            reported.add(ev.index)
            n_cached = ev.timings.cache_n if ev.timings is not None else 0
            head.append({"index": ev.index, "content": "", "stop": False, "prompt_progress": {
                "total": ev.n_prompt, "cache": n_cached, "processed": ev.n_prompt,
                "time_ms": (time.monotonic() - t0) * 1e3}})
        if isinstance(ev, PartialEvent):
            return [*head, native_partial(ev, params.post_sampling_probs)]
        return [*head, final(ev, True)]

    # one prompt's error does not end the others' streams in a multi-prompt request
    return await stream_events(sub, fmt, stop_on_error=False)


async def stream_events(sub: Submission, fmt: Callable[[PartialEvent | FinalEvent], list[dict]],
                        head: Sequence[dict] = (), done: bool = False, stop_on_error: bool = True,
                        encode: Callable[[dict], str] = sse) -> Response:
    """SSE: `head`, then each event's chunks (and `data: [DONE]` when `done`), each written by
    `encode`. An error before the first event is an HTTP error; a later one is an error event."""
    first = await _first(sub)
    if isinstance(first, ErrorEvent):
        sub.close()
        raise APIError(first.code, first.message, first.type)
    sub.stop_watching()

    async def gen() -> AsyncIterator[str]:
        ev = first
        try:
            for h in head:
                yield encode(h)
            while ev is not None:
                if isinstance(ev, ErrorEvent):
                    yield encode(error_body(ev.code, ev.message, ev.type))
                    if stop_on_error:
                        return
                else:
                    for chunk in fmt(ev):
                        yield encode(chunk)
                ev = await sub.next()
            if done:
                yield SSE_DONE
        except APIError as e:
            yield encode(e.body())
        except ClientGone:
            return
        finally:
            sub.close()

    return StreamingResponse(gen(), media_type="text/event-stream", headers=SSE_HEADERS)


def _detok(st: ServerState, ids: list[int]) -> str:
    assert st.model is not None
    return st.model.tokenizer.decode(ids)


async def _collect(sub: Submission) -> list[FinalEvent]:
    try:
        return await sub.collect()
    except ClientGone:
        raise APIError(499, "client closed the connection", "server_error") from None


async def _first(sub: Submission):  # noqa: ANN202 - Event | None
    try:
        ev = await sub.next()
    except ClientGone:
        raise APIError(499, "client closed the connection", "server_error") from None
    except APIError:
        sub.close()
        raise
    return ev


@router.post("/tokenize")
async def tokenize(request: Request, r: TokenizeRequest) -> Response:
    st = _ready(request)
    assert st.model is not None
    tok = st.model.tokenizer
    ids = await run_in_threadpool(tok.encode, r.content, add_special=bool(r.add_special),
                                  parse_special=r.parse_special is not False)
    if not r.with_pieces:
        return JSONResponse({"tokens": ids})
    out = []
    for t in ids:
        piece = tok.token_to_piece(t)
        try:
            out.append({"id": t, "piece": piece.decode("utf-8")})
        except UnicodeDecodeError:
            out.append({"id": t, "piece": list(piece)})
    return JSONResponse({"tokens": out})


@router.post("/detokenize")
async def detokenize(request: Request, r: DetokenizeRequest) -> Response:
    st = _ready(request)
    assert st.model is not None
    tokens = r.tokens
    tok = st.model.tokenizer
    bad = [t for t in tokens if not 0 <= t < tok.n_vocab]
    if bad:
        raise bad_request(f"token id {bad[0]} is out of range [0, {tok.n_vocab})")
    return JSONResponse({"content": tok.decode(tokens)})


@router.post("/apply-template")
async def apply_template(request: Request, r: ApplyTemplateRequest) -> Response:
    st = _ready(request)
    body = r.fields()
    messages = parse_messages(body.get("messages"))
    return JSONResponse({"prompt": chat_prompt(st, body, messages, template_extra(body)).text})
