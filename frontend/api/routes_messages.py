"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API on the chat engine.

The body is converted to a chat-completions body (as llama-server's
server_chat_convert_anthropic_to_oai does) and runs through `chatreq` like /v1/chat/completions:
`system`, text / tool_use / tool_result blocks, `stop_sequences`, `temperature`, `top_p`,
`top_k`, `tools` + `tool_choice` (auto, any, a named tool, none) as tool calls, and
`output_config.format` (a JSON schema) as structured output. Unlike llama-server, `max_tokens` is required (as
Anthropic requires it), `{"type": "tool"}` forces that one tool, not any, and a matched stop
sequence is `stop_reason: "stop_sequence"` (llama-server says `end_turn`). Errors on these
routes carry Anthropic's `"type": "error"` beside llama.cpp's `error` object (app.py)."""
from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from ..engine import STOP_WORD, FinalEvent, PartialEvent
from .chat_prepare import PreparedChat, chat_tokens, cut_by_length, prepare_chat, reply_parts
from .errors import bad_request
from .formats import completion_id
from .routes_native import _collect, _ready, stream_events
from .schemas import ChatRequest, MessagesRequest, validated
from .stream import Submission, sse_event
from .tools import parse_tools

router = APIRouter()

_PASS = ("temperature", "top_p", "top_k", "stream", "chat_template_kwargs")


# -- the request ----------------------------------------------------------------------------------------
def _text_blocks(raw: Any, where: str) -> str:
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, list):
        raise bad_request(f"{where} must be a string or an array of text blocks")
    out = []
    for j, block in enumerate(raw):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise bad_request(f"{where}[{j}] must be a text block {{\"type\": \"text\", \"text\": ...}}")
        out.append(block["text"])
    return "".join(out)


def _message(i: int, m: Any, names: dict[str, str]) -> list[dict]:
    """One Anthropic message -> its chat messages: the turn (text and tool calls), then one
    `tool` message per tool_result. `names` maps tool_use ids to their tools."""
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise bad_request(f"{where} must be an object")
    role = m.get("role")
    if role not in ("user", "assistant"):
        raise bad_request(f"{where}.role must be \"user\" or \"assistant\", got {role!r}")
    content = m.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or an array of content blocks")
    text, calls, results = [], [], []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        w = f"{where}.content[{j}]"
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise bad_request(f"{w}.text must be a string")
            text.append(block["text"])
        elif kind == "tool_use":
            tid, name, inp = block.get("id"), block.get("name"), block.get("input", {})
            if not isinstance(tid, str) or not isinstance(name, str) or not name or not isinstance(inp, dict):
                raise bad_request(f"{w}: a tool_use block needs a string 'id', a 'name' and an object 'input'")
            names[tid] = name
            calls.append({"id": tid, "type": "function",
                          "function": {"name": name, "arguments": json.dumps(inp, ensure_ascii=False)}})
        elif kind == "tool_result":
            tid = block.get("tool_use_id")
            if not isinstance(tid, str):
                raise bad_request(f"{w}.tool_use_id must be a string")
            out = block.get("content", "")
            results.append({"role": "tool", "tool_call_id": tid, "name": names.get(tid, ""),
                            "content": _text_blocks(out, f"{w}.content")})
        elif kind in ("thinking", "redacted_thinking"):
            continue                            # echoed back by clients; this server makes none
        else:
            raise bad_request(f"{w}.type {kind!r} is not supported (text, tool_use, tool_result)")
    turn = []
    if text or calls:
        msg: dict[str, Any] = {"role": role, "content": "".join(text)}
        if calls:
            msg["tool_calls"] = calls
        turn.append(msg)
    return turn + results


def _tools(raw: Any) -> list[dict] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise bad_request("'tools' must be an array")
    out = []
    for i, t in enumerate(raw):
        if not isinstance(t, dict) or t.get("type", "custom") != "custom" or not isinstance(t.get("input_schema"), dict):
            raise bad_request(f"tools[{i}] must be a client tool {{\"name\", \"description\", \"input_schema\"}}")
        fn = {"name": t.get("name"), "parameters": t["input_schema"]}
        if t.get("description") is not None:
            fn["description"] = t["description"]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(raw: Any) -> tuple[Any, bool]:
    """(the chat tool_choice, parallel calls allowed)."""
    if not isinstance(raw, dict):
        raise bad_request("'tool_choice' must be an object {\"type\": \"auto\" | \"any\" | \"tool\" | \"none\"}")
    kind = raw.get("type")
    parallel = raw.get("disable_parallel_tool_use") is False      # one call a turn unless asked for more
    if kind == "auto":
        return "auto", parallel
    if kind == "any":
        return "required", parallel
    if kind == "none":
        return "none", False
    if kind == "tool":
        if not isinstance(raw.get("name"), str):
            raise bad_request("'tool_choice.name' must be a string")
        return {"type": "function", "function": {"name": raw["name"]}}, False
    raise bad_request(f"'tool_choice.type' must be \"auto\", \"any\", \"tool\" or \"none\", got {kind!r}")


def _response_format(config: Any) -> dict | None:
    """Anthropic's structured outputs, `output_config.format` {"type": "json_schema", "schema"}."""
    if config is None:
        return None
    if not isinstance(config, dict):
        raise bad_request("'output_config' must be an object")
    fmt = config.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or fmt.get("schema") is None:
        raise bad_request("'output_config.format' must be {\"type\": \"json_schema\", \"schema\": {...}}")
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}


def to_chat_body(body: dict[str, Any], count_tokens: bool = False) -> dict[str, Any]:
    """An Anthropic Messages body -> the chat-completions body that runs it."""
    messages: list[dict] = []
    if body.get("system") is not None:
        messages.append({"role": "system", "content": _text_blocks(body["system"], "'system'")})
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad_request("'messages' must be a non-empty array")
    names: dict[str, str] = {}
    for i, m in enumerate(raw):
        messages += _message(i, m, names)
    if all(m["role"] == "system" for m in messages):
        raise bad_request("'messages' holds no text, tool_use or tool_result content")
    chat: dict[str, Any] = {k: body[k] for k in _PASS if k in body}
    chat["messages"] = messages
    if not count_tokens:
        if body.get("max_tokens") is None:
            raise bad_request("'max_tokens' is required")
        chat["max_tokens"] = body["max_tokens"]
    if body.get("stop_sequences") is not None:
        chat["stop"] = list(body["stop_sequences"])
    rf = _response_format(body.get("output_config"))
    if rf is not None:
        chat["response_format"] = rf
    tools = _tools(body.get("tools"))
    if tools is not None:
        chat["tools"] = tools
    if body.get("tool_choice") is not None:
        chat["tool_choice"], chat["parallel_tool_calls"] = _tool_choice(body["tool_choice"])
    return chat


# -- the reply --------------------------------------------------------------------------------------------
def _stop(f: FinalEvent, calls: list[dict], stop: list[str]) -> tuple[str, str | None]:
    if cut_by_length(f):
        return "max_tokens", None
    if calls:
        return "tool_use", None
    if f.stop_type == STOP_WORD and f.stopping_word in stop:
        return "stop_sequence", f.stopping_word
    return "end_turn", None


def _tool_use(call: dict) -> dict:
    args = call["function"]["arguments"]
    try:
        inp = json.loads(args)
    except json.JSONDecodeError:
        inp = {}
    return {"type": "tool_use", "id": "toolu_" + call["id"].removeprefix("call_"), "name": call["function"]["name"],
            "input": inp if isinstance(inp, dict) else {"value": inp}}


def content_blocks(f: FinalEvent, req: PreparedChat) -> tuple[list[dict], list[dict]]:
    """(the reply's content blocks: the text unless the model only called tools, then one
    tool_use per call; the calls)."""
    text, calls = reply_parts(f, req.spec)
    blocks = [{"type": "text", "text": text}] if text or not calls else []
    return blocks + [_tool_use(c) for c in calls], calls


def _usage(n_prompt: int, n_cached: int, n_out: int) -> dict:
    """As llama-server counts them: `input_tokens` the prompt tokens not read from the cache."""
    return {"input_tokens": n_prompt - n_cached, "cache_read_input_tokens": n_cached,
            "cache_creation_input_tokens": 0, "output_tokens": n_out}


def _message_json(mid: str, model: str, content: list[dict], stop_reason: str | None, stop_sequence: str | None,
                  usage: dict) -> dict:
    return {"id": mid, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": usage}


def _block_events(index: int, block: dict) -> list[dict]:
    """A whole block at once (the output held back for tool calls)."""
    if block["type"] == "text":
        start, delta = {"type": "text", "text": ""}, {"type": "text_delta", "text": block["text"]}
    else:
        start = {**block, "input": {}}
        delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)}
    return [{"type": "content_block_start", "index": index, "content_block": start},
            {"type": "content_block_delta", "index": index, "delta": delta},
            {"type": "content_block_stop", "index": index}]


@router.post("/v1/messages")
async def messages(request: Request, r: MessagesRequest) -> Response:
    st = _ready(request)
    chat = to_chat_body(r.fields())
    req = await prepare_chat(st, validated(ChatRequest, chat))
    model = r.model or st.settings.model_name
    stop = chat.get("stop", [])
    mid = completion_id("msg_")
    sub = Submission(st, request, [req.prompt], req.params)
    sub.start()
    if not req.params.stream:
        f = (await _collect(sub))[0]
        blocks, calls = content_blocks(f, req)
        return JSONResponse(_message_json(mid, model, blocks, *_stop(f, calls, stop),
                                          _usage(f.n_prompt, f.timings.cache_n, f.n_decoded)))

    head = [{"type": "message_start", "message": _message_json(mid, model, [], None, None,
                                                                         _usage(len(req.prompt), 0, 0))}]
    if req.spec is None:
        head.append({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
    head.append({"type": "ping"})

    def fmt(ev: PartialEvent | FinalEvent) -> list[dict]:
        if isinstance(ev, PartialEvent):
            if req.spec is None and ev.text:
                return [{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": ev.text}}]
            return []
        blocks, calls = content_blocks(ev, req)
        if req.spec is None:
            out = [{"type": "content_block_stop", "index": 0}]
        else:
            out = [e for i, blk in enumerate(blocks) for e in _block_events(i, blk)]
        reason, seq = _stop(ev, calls, stop)
        return [*out, {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": seq},
                       "usage": _usage(ev.n_prompt, ev.timings.cache_n, ev.n_decoded)},
                {"type": "message_stop"}]

    return await stream_events(sub, fmt, head, encode=sse_event)


@router.post("/v1/messages/count_tokens")
async def count_tokens(request: Request, r: MessagesRequest) -> Response:
    """The prompt's tokens as /v1/messages would render it (system, messages, tools)."""
    st = _ready(request)
    chat = to_chat_body(r.fields(), count_tokens=True)
    _, prompt = await chat_tokens(st, chat, parse_tools(chat, st.chat_template))
    return JSONResponse({"input_tokens": len(prompt)})
