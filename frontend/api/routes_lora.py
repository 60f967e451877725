"""llama-server's LoRA adapter routes: `GET /lora-adapters` lists the adapters loaded with --lora /
--lora-scaled (`[{"id", "path", "scale"}]`), `POST /lora-adapters` sets their global scales from
`[{"id", "scale"}]` (an adapter not listed gets 0, as llama.cpp's parse_lora_request), applied on
the engine thread between two steps. A request's own `lora` field (params.py) overrides the global
scales for that request; running requests keep the scales they started with."""
from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from ..model.lora import parse_scales
from .errors import APIError, bad_request
from .state import ServerState

router = APIRouter()


def _ready(request: Request) -> ServerState:
    st: ServerState = request.app.state.llamarpc
    if not st.ready:
        raise APIError(503, "Loading model", "unavailable_error")
    return st


@router.get("/lora-adapters")
async def list_adapters(request: Request) -> Response:
    st = _ready(request)
    assert st.model is not None
    return JSONResponse([a.to_json() for a in st.model.adapters])


@router.post("/lora-adapters")
async def set_adapters(request: Request) -> Response:
    st = _ready(request)
    assert st.model is not None and st.engine is not None
    raw = await request.body()
    try:
        body = json.loads(raw) if raw.strip() else None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"Invalid JSON in the request body: {e}") from None
    if not isinstance(body, list):
        raise bad_request("Request body must be an array")
    adapters = st.model.adapters
    try:
        scales = parse_scales(body, adapters)
    except ValueError as e:
        raise bad_request(str(e)) from None

    def apply(_engine: object) -> None:
        for a, s in zip(adapters, scales):
            a.scale = s

    try:
        await asyncio.wait_for(asyncio.wrap_future(st.engine.call(apply)), st.settings.timeout)
    except asyncio.TimeoutError:
        raise APIError(503, "the engine did not take the new scales in time", "unavailable_error") from None
    return JSONResponse({"success": True})
