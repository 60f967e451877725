"""One HTTP request's tasks and their events, as the handler sees them.

Handlers only enqueue tasks and read their own event queue; non-streamed replies are built from
the same events a stream would send. A client that disconnects cancels its tasks (the engine frees
the slots before its next step); a request that gets no event for `--timeout` seconds is cancelled
and answered with an error."""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request

from ..engine import ErrorEvent, Event, FinalEvent, PartialEvent, TaskParams
from ..engine.fork import choice_tasks
from .errors import APIError
from .metrics import RequestClock
from .state import ServerState

log = logging.getLogger(__name__)


class ClientGone(Exception):
    """The client closed the connection."""


_DISCONNECTED = object()


class Submission:
    def __init__(self, state: ServerState, request: Request, prompts: list[list[int]], params: TaskParams,
                 n: int = 1) -> None:
        if state.engine is None:
            raise APIError(503, "Loading model", "unavailable_error")
        self.engine = state.engine
        self.request = request
        self.timeout = state.settings.timeout
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.n = n      # choices per prompt: task index = prompt index * n + choice (engine/fork.py)
        self.tasks = [t for i, p in enumerate(prompts) for t in choice_tasks(p, params, n, self._sink, i * n)]
        self.open = set(range(len(self.tasks)))
        self.clocks = [RequestClock(state.observer) for _ in self.tasks]   # the /metrics histograms
        self._watch: asyncio.Task[None] | None = None

    def _sink(self, ev: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)

    def start(self, watch_disconnect: bool = True) -> None:
        for t in self.tasks:
            self.engine.submit(t)
        if watch_disconnect:
            self._watch = asyncio.ensure_future(self._watch_disconnect())

    async def _watch_disconnect(self) -> None:
        while True:
            msg = await self.request.receive()
            if msg["type"] == "http.disconnect":
                self.queue.put_nowait(_DISCONNECTED)
                return

    def stop_watching(self) -> None:
        """Hand disconnect detection over (a StreamingResponse listens for it itself)."""
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    def close(self) -> None:
        self.stop_watching()
        for t in self.tasks:
            if t.index in self.open:
                self.engine.cancel(t)
        self.open.clear()

    async def next(self) -> Event | None:
        """The next event of any of the tasks; None once all have ended."""
        if not self.open:
            return None
        try:
            ev = await asyncio.wait_for(self.queue.get(), self.timeout)
        except asyncio.TimeoutError:
            self.close()
            raise APIError(503, f"no result within the server timeout ({self.timeout:g} s)",
                           "unavailable_error") from None
        if ev is _DISCONNECTED:
            self.close()
            raise ClientGone()
        if isinstance(ev, PartialEvent) and ev.tokens:
            self.clocks[ev.index].token(len(ev.tokens))
        elif isinstance(ev, FinalEvent) and ev.index in self.open:
            self.clocks[ev.index].final(ev.timings.prompt_ms, ev.timings.predicted_ms)
        if isinstance(ev, (FinalEvent, ErrorEvent)):
            self.open.discard(ev.index)
        return ev

    async def events(self) -> AsyncIterator[Event]:
        while True:
            ev = await self.next()
            if ev is None:
                return
            yield ev

    async def collect(self) -> list[FinalEvent]:
        """Run to the end (non-streamed reply); an error event becomes an APIError."""
        finals: dict[int, FinalEvent] = {}
        try:
            async for ev in self.events():
                if isinstance(ev, ErrorEvent):
                    raise APIError(ev.code, ev.message, ev.type)
                if isinstance(ev, FinalEvent):
                    finals[ev.index] = ev
        finally:
            self.close()
        return [finals[i] for i in range(len(self.tasks))]


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def sse_event(data: dict) -> str:
    """A named SSE event (`event: <its type>`), as the Responses and Anthropic streams send them;
    an error chunk (no type) goes out as an `error` event with `"type": "error"` in its data."""
    if "type" not in data:
        data = {"type": "error", **data}
    return f"event: {data['type']}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
