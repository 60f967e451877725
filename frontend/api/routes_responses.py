"""POST /v1/responses: OpenAI's Responses API on the chat engine.

The body is converted to a chat-completions body (as llama-server's
server_chat_convert_responses_to_chatcmpl does) and runs through `chatreq` like
/v1/chat/completions: the template, the sampling fields, `text.format` as `response_format`,
function `tools` as tool calls. The reply is a `response` object; a stream is the Responses SSE
events (`event: <type>` + `data:`, each with its `sequence_number`), as the OpenAI SDK reads them.
Nothing is stored: `previous_response_id` and `conversation` are refused."""
from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from ..engine import FinalEvent, PartialEvent
from .chat_prepare import cut_by_length, prepare_chat, reply_parts
from .errors import bad_request
from .formats import completion_id
from .routes_native import _collect, _ready, stream_events
from .schemas import ChatRequest, ResponsesRequest, validated
from .stream import Submission, sse_event

router = APIRouter()

_TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "refusal")
_ROLES = ("user", "assistant", "system", "developer")
# the Responses fields this server reads itself, or takes and ignores; the rest (top_k, seed,
# min_p, ... llama.cpp's own sampling fields) pass through to the chat body as llama-server passes them
_OWN = frozenset({"input", "instructions", "max_output_tokens", "text", "tools", "tool_choice", "stream_options",
                  "top_logprobs", "store", "metadata", "reasoning", "truncation", "include", "user", "background",
                  "service_tier", "prompt_cache_key", "safety_identifier", "prompt", "max_tool_calls", "messages",
                  "response_format"})


# -- the request ----------------------------------------------------------------------------------------
def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string or an array of content parts")
    out = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise bad_request(f"{where}[{j}]: only text parts ({', '.join(_TEXT_PARTS[:2])}) are supported, got {kind!r}")
        text = part.get("refusal") if part["type"] == "refusal" else part.get("text")
        if not isinstance(text, str):
            raise bad_request(f"{where}[{j}].text must be a string")
        out.append(text)
    return "".join(out)


def _input_messages(raw: Any) -> list[dict]:
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise bad_request("'input' must be a string or a non-empty array of input items")
    out: list[dict] = []
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"{where} must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise bad_request(f"{where}.role must be one of {', '.join(_ROLES)}, got {role!r}")
            out.append({"role": role, "content": _text_of(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            name, args, cid = item.get("name"), item.get("arguments", "{}"), item.get("call_id")
            if not isinstance(name, str) or not name or not isinstance(args, str) or not isinstance(cid, str):
                raise bad_request(f"{where}: a function_call needs string 'call_id', 'name' and 'arguments'")
            call = {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}
            if out and out[-1]["role"] == "assistant" and "tool_calls" in out[-1]:
                out[-1]["tool_calls"].append(call)     # parallel calls: one assistant turn
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            cid = item.get("call_id")
            if not isinstance(cid, str):
                raise bad_request(f"{where}.call_id must be a string")
            name = next((c["function"]["name"] for m in out for c in m.get("tool_calls", ()) if c["id"] == cid), "")
            out.append({"role": "tool", "tool_call_id": cid, "name": name,
                        "content": _text_of(item.get("output"), f"{where}.output")})
        elif kind == "reasoning":
            continue                            # echoed back by clients; this server makes none
        else:
            raise bad_request(f"{where}.type {kind!r} is not supported "
                              "(message, function_call, function_call_output)")
    return out


def _tools(raw: Any) -> list[dict] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise bad_request("'tools' must be an array")
    out = []
    for i, t in enumerate(raw):
        if not isinstance(t, dict) or t.get("type") != "function":
            kind = t.get("type") if isinstance(t, dict) else None
            raise bad_request(f"tools[{i}]: only function tools are supported, got type {kind!r}")
        fn = {k: t[k] for k in ("name", "description", "parameters") if t.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(raw: Any) -> Any:
    if isinstance(raw, dict) and raw.get("type") == "function":
        return {"type": "function", "function": {"name": raw.get("name")}}
    return raw


def _response_format(text: Any) -> dict | None:
    if text is None:
        return None
    if not isinstance(text, dict):
        raise bad_request("'text' must be an object")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise bad_request("'text.format' must be an object")
    if fmt.get("type") == "json_schema":
        if fmt.get("schema") is None:
            raise bad_request("'text.format.schema' is required")
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name", ""), "schema": fmt["schema"],
                                                       "strict": fmt.get("strict", False)}}
    if fmt.get("type") in ("json_object", "text"):
        return {"type": fmt["type"]}
    raise bad_request(f"'text.format.type' must be one of \"text\", \"json_object\" or \"json_schema\", "
                      f"got {fmt.get('type')!r}")


def to_chat_body(body: dict[str, Any]) -> dict[str, Any]:
    """A Responses body -> the chat-completions body that runs it."""
    for key in ("previous_response_id", "conversation"):
        if body.get(key) is not None:
            raise bad_request(f"'{key}' is not supported: this server stores no responses")
    messages = _input_messages(body.get("input"))
    if not messages:
        raise bad_request("'input' holds no message, function_call or function_call_output item")
    instructions = body.get("instructions")
    if instructions:
        messages.insert(0, {"role": "system", "content": instructions})
    chat = {k: v for k, v in body.items() if k not in _OWN}
    chat["messages"] = messages
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    rf = _response_format(body.get("text"))
    if rf is not None:
        chat["response_format"] = rf
    tools = _tools(body.get("tools"))
    if tools is not None:
        chat["tools"] = tools
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    return chat


# -- the reply --------------------------------------------------------------------------------------------
def _part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message(mid: str, text: str | None, status: str = "completed") -> dict:
    return {"id": mid, "type": "message", "status": status, "role": "assistant",
            "content": [] if text is None else [_part(text)]}


def _call_item(call: dict) -> dict:
    fn = call["function"]
    return {"id": "fc_" + call["id"].removeprefix("call_"), "type": "function_call", "status": "completed",
            "call_id": call["id"], "name": fn["name"], "arguments": fn["arguments"]}


def output_items(f: FinalEvent, spec: Any, mid: str) -> list[dict]:
    """The output: a message with the text (unless the model only called tools), then the calls."""
    text, calls = reply_parts(f, spec)
    items = [_message(mid, text)] if text or not calls else []
    return items + [_call_item(c) for c in calls]


def _usage(f: FinalEvent) -> dict:
    return {"input_tokens": f.n_prompt, "input_tokens_details": {"cached_tokens": f.timings.cache_n},
            "output_tokens": f.n_decoded, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": f.n_prompt + f.n_decoded}


def response_base(body: dict[str, Any], rid: str, model: str) -> dict:
    """The response object's fields that do not depend on the output (the request echoed)."""
    def raw(key: str, default: Any = None) -> Any:
        return default if body.get(key) is None else body[key]

    text = body.get("text") or {}
    return {"id": rid, "object": "response", "created_at": int(time.time()), "status": "in_progress",
            "background": False, "error": None, "incomplete_details": None, "instructions": raw("instructions"),
            "max_output_tokens": raw("max_output_tokens"), "model": model, "output": [],
            "parallel_tool_calls": raw("parallel_tool_calls", False), "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None}, "store": False, "temperature": raw("temperature"),
            "text": {"format": text.get("format") or {"type": "text"}}, "tool_choice": raw("tool_choice", "auto"),
            "tools": raw("tools", []), "top_p": raw("top_p"), "truncation": "disabled", "usage": None,
            "user": None, "metadata": raw("metadata", {})}


def finished(base: dict, f: FinalEvent, items: list[dict]) -> dict:
    out = {**base, "output": items, "usage": _usage(f), "completed_at": int(time.time())}
    out["output_text"] = "".join(p["text"] for it in items if it["type"] == "message" for p in it["content"])
    if cut_by_length(f):
        out["status"] = "incomplete"
        out["incomplete_details"] = {"reason": "max_output_tokens"}
    else:
        out["status"] = "completed"
    return out


class EventWriter:
    """The Responses stream's events, numbered."""

    def __init__(self) -> None:
        self.seq = 0

    def __call__(self, type_: str, **fields: Any) -> dict:
        ev = {"type": type_, "sequence_number": self.seq, **fields}
        self.seq += 1
        return ev

    def open_message(self, index: int, mid: str) -> list[dict]:
        return [self("response.output_item.added", output_index=index, item=_message(mid, None, "in_progress")),
                self("response.content_part.added", item_id=mid, output_index=index, content_index=0,
                     part=_part(""))]

    def text_delta(self, index: int, mid: str, text: str) -> dict:
        return self("response.output_text.delta", item_id=mid, output_index=index, content_index=0, delta=text,
                    logprobs=[])

    def close_message(self, index: int, item: dict) -> list[dict]:
        part = item["content"][0]
        return [self("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                     text=part["text"], logprobs=[]),
                self("response.content_part.done", item_id=item["id"], output_index=index, content_index=0, part=part),
                self("response.output_item.done", output_index=index, item=item)]

    def item(self, index: int, item: dict) -> list[dict]:
        """A whole item at once (the output held back for tool calls)."""
        if item["type"] == "message":
            return [*self.open_message(index, item["id"]), self.text_delta(index, item["id"], item["content"][0]["text"]),
                    *self.close_message(index, item)]
        return [self("response.output_item.added", output_index=index, item={**item, "status": "in_progress",
                                                                             "arguments": ""}),
                self("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                     delta=item["arguments"]),
                self("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                     name=item["name"], arguments=item["arguments"]),
                self("response.output_item.done", output_index=index, item=item)]


@router.post("/v1/responses")
@router.post("/responses")
async def responses(request: Request, r: ResponsesRequest) -> Response:
    st = _ready(request)
    body = r.fields()
    req = await prepare_chat(st, validated(ChatRequest, to_chat_body(body)))
    model = r.model or st.settings.model_name
    base = response_base(body, completion_id("resp_"), model)
    mid = completion_id("msg_")
    sub = Submission(st, request, [req.prompt], req.params)
    sub.start()
    if not req.params.stream:
        f = (await _collect(sub))[0]
        return JSONResponse(finished(base, f, output_items(f, req.spec, mid)))

    w = EventWriter()
    head = [w("response.created", response=base), w("response.in_progress", response=base)]
    if req.spec is None:
        head += w.open_message(0, mid)

    def fmt(ev: PartialEvent | FinalEvent) -> list[dict]:
        if isinstance(ev, PartialEvent):
            return [w.text_delta(0, mid, ev.text)] if req.spec is None and ev.text else []
        items = output_items(ev, req.spec, mid)
        if req.spec is None:
            out = w.close_message(0, items[0])
        else:
            out = [e for i, it in enumerate(items) for e in w.item(i, it)]
        final = finished(base, ev, items)
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        return [*out, w(kind, response=final)]

    return await stream_events(sub, fmt, head, encode=sse_event)
