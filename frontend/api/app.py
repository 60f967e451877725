"""The FastAPI app: routes, API-key and loading gates, errors in llama.cpp's shape."""
from __future__ import annotations

import hmac
import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ... import __version__
from .errors import APIError, error_body_for, error_response
from .guard import BodyGuard
from .routes_embed import router as embed_router
from .routes_infill import router as infill_router
from .routes_llmapi import router as llmapi_router
from .routes_lora import router as lora_router
from .routes_messages import router as messages_router
from .routes_native import router as native_router
from .routes_oai import router as oai_router
from .routes_responses import router as responses_router
from .schemas import validation_message
from .state import ServerState
from .webui import router as webui_router

log = logging.getLogger(__name__)

# the chat page holds no secrets (llama-server serves its UI without a key too); its API calls carry the key.
# The API's description (/openapi.json, /docs) is the same for every server: request shapes, no model data.
PUBLIC_PATHS = frozenset({"/health", "/v1/health", "/", "/index.html", "/openapi.json", "/docs"})


class Gate:
    """Pure ASGI middleware (streams and disconnects pass through untouched): a Bearer key on
    every route but /health when keys are set (401), and 503 while the model loads."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        keys = self.state.settings.api_keys
        if keys:
            headers = dict(scope.get("headers") or [])
            auth = headers.get(b"authorization", b"").decode("latin-1")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get(b"x-api-key", b"").decode(
                "latin-1")
            if not any(hmac.compare_digest(given.encode(), k.encode()) for k in keys):
                await _send_json(send, 401, error_body_for(scope["path"], 401, "Invalid API Key",
                                                          "authentication_error"))
                return
        if not self.state.ready:
            await _send_json(send, 503, error_body_for(scope["path"], 503, self.state.load_error or "Loading model",
                                                       "unavailable_error"))
            return
        await self.app(scope, receive, send)


async def _send_json(send: Send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="llamarpc", version=__version__, docs_url="/docs", redoc_url=None, openapi_url="/openapi.json",
                  description="llama.cpp-server, OpenAI and llm-api HTTP APIs; request bodies as in `schemas.py`")
    app.state.llamarpc = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return error_response(exc.code, exc.message, exc.type, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = "File Not Found" if exc.status_code == 404 else str(exc.detail)
        return error_response(exc.status_code, message, path=request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error_response(400, validation_message(list(exc.errors())), path=request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(500, f"{type(exc).__name__}: {exc}", "server_error", request.url.path)

    app.include_router(native_router)
    app.include_router(oai_router)
    app.include_router(responses_router)
    app.include_router(messages_router)
    app.include_router(llmapi_router)
    app.include_router(embed_router)
    app.include_router(infill_router)
    app.include_router(lora_router)
    if state.settings.webui:
        app.include_router(webui_router)
    s = state.settings
    app.add_middleware(BodyGuard, max_body=s.max_body, max_depth=s.max_json_depth)    # after the key check
    app.add_middleware(Gate, state=state)
    # llama-server's CORS: the Origin reflected, with credentials; --cors-origins narrows it
    app.add_middleware(CORSMiddleware, allow_origins=list(s.cors_origins), allow_credentials=True,
                       allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"])
    return app
