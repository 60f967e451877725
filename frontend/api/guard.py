"""What every request body passes before a handler reads it (pure ASGI, streams untouched):

- at most `max_body` bytes (a Content-Length above it, or a body that grows past it, is a 413 at
  once, before the rest is read);
- JSON nested at most `max_json_depth` deep (a 400; Python's parser would raise RecursionError);
- no lone UTF-16 surrogate escapes (``"\\ud800"``): text a tokenizer cannot encode is a 400.
The depth and surrogate checks scan the raw bytes (C-speed regex and numpy), before any parsing."""
from __future__ import annotations

import json
import re

import numpy as np
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_body_for

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
# an escape \uD800-\uDBFF not followed by \uDC00-\uDFFF, or a \uDC00-\uDFFF not preceded by a high one
_LONE = re.compile(rb'(?<!\\)(?:\\\\)*\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})'
                   rb'|(?<![\\]u[dD][89abAB][0-9a-fA-F]{2})(?<!\\)(?:\\\\)*\\u[dD][c-fC-F][0-9a-fA-F]{2}')
_OPEN = np.zeros(256, np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


def json_depth(raw: bytes) -> int:
    """The deepest bracket nesting of a JSON text, strings ignored."""
    if b"[" not in raw and b"{" not in raw:
        return 0
    bare = _STRING.sub(b'""', raw)
    steps = _OPEN[np.frombuffer(bare, np.uint8)]
    steps = steps[steps != 0]
    return int(np.cumsum(steps, dtype=np.int32).max(initial=0))


def body_problem(raw: bytes, max_depth: int) -> str | None:
    """Why a JSON-looking body is refused, or None."""
    head = raw.lstrip()[:1]
    if head not in (b"{", b"["):
        return None
    depth = json_depth(raw)
    if depth > max_depth:
        return f"the request JSON is nested {depth} levels deep; at most {max_depth} are accepted"
    if b"\\u" in raw and _LONE.search(raw):
        return "the request contains an invalid UTF-16 surrogate escape (a lone \\ud800-\\udfff)"
    return None


class BodyGuard:
    def __init__(self, app: ASGIApp, max_body: int, max_depth: int) -> None:
        self.app = app
        self.max_body = max_body
        self.max_depth = max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await _refuse(send, scope["path"], 413, self._too_large())
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                await self.app(scope, _replay([], msg, receive), send)   # a disconnect: let the app see it
                return
            body = msg.get("body", b"")
            size += len(body)
            if size > self.max_body:
                await _refuse(send, scope["path"], 413, self._too_large())
                return
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        raw = b"".join(chunks)
        problem = body_problem(raw, self.max_depth)
        if problem is not None:
            await _refuse(send, scope["path"], 400, problem)
            return
        await self.app(scope, _replay([raw], None, receive), send)

    def _too_large(self) -> str:
        return f"the request body is larger than the server's limit ({self.max_body} bytes, --max-body)"


def _replay(bodies: list[bytes], pending: Message | None, receive: Receive) -> Receive:
    queue: list[Message] = [{"type": "http.request", "body": b, "more_body": False} for b in bodies]
    if pending is not None:
        queue.append(pending)

    async def replay() -> Message:
        if queue:
            return queue.pop(0)
        return await receive()
    return replay


async def _refuse(send: Send, path: str, status: int, message: str) -> None:
    data = json.dumps(error_body_for(path, status, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})
