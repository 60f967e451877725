"""Chat messages -> the prompt, through the model's chat template (or --chat-template[-file])."""
from __future__ import annotations

import json
from typing import Any

from ..model.tokenizer import Tokenizer
from .chat_request import chat_prompt
from .errors import bad_request
from .state import ServerState

_ROLES = ("system", "user", "assistant", "tool", "developer", "function")


def parse_messages(raw: Any) -> list[dict]:
    """OpenAI-style messages, checked: a non-empty array of {role, content}; content is a string
    or an array of text parts (joined)."""
    if not isinstance(raw, list) or not raw:
        raise bad_request("'messages' must be a non-empty array")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}] must be an object")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise bad_request(f"messages[{i}].role must be a non-empty string")
        if role not in _ROLES:
            raise bad_request(f"messages[{i}].role {role!r} is not one of {', '.join(_ROLES)}")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad_request(f"messages[{i}].content: only text parts are supported")
                parts.append(part["text"])
            content = "".join(parts)
        elif content is None:
            if not (role == "assistant" and m.get("tool_calls")):
                raise bad_request(f"messages[{i}].content is required")
            content = ""
        elif not isinstance(content, str):
            raise bad_request(f"messages[{i}].content must be a string or an array of text parts")
        if m.get("reasoning_content") is not None and not isinstance(m["reasoning_content"], str):
            raise bad_request(f"messages[{i}].reasoning_content must be a string")
        msg = dict(m)
        msg["content"] = content
        out.append(msg)
    return out


def render_prompt(state: ServerState, messages: list[dict]) -> str:
    """llm-api's /chat: a conversation ending with the user's message, with the generation prompt
    (the OpenAI route and /apply-template take their options through chat_request.chat_prompt)."""
    return chat_prompt(state, {}, messages, {}).text


def template_extra(body: dict) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    kw = body.get("chat_template_kwargs")
    if kw is not None:
        if isinstance(kw, str):
            try:
                kw = json.loads(kw)
            except json.JSONDecodeError:
                raise bad_request("'chat_template_kwargs' must be a JSON object") from None
        if not isinstance(kw, dict):
            raise bad_request("'chat_template_kwargs' must be an object")
        extra.update(kw)
    if body.get("tools") is not None:
        if not isinstance(body["tools"], list):
            raise bad_request("'tools' must be an array")
        extra["tools"] = body["tools"]
    return extra


def encode_chat(tok: Tokenizer, text: str) -> list[int]:
    """Tokenize a rendered chat prompt: specials parsed, BOS added when the model wants one but
    not twice when the template already wrote it."""
    ids = tok.encode(text, add_special=True, parse_special=True)
    if tok.bos_id is not None and len(ids) >= 2 and ids[0] == ids[1] == tok.bos_id and tok.add_bos:
        ids = ids[1:]
    return ids
