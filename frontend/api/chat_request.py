"""A chat request's template options, checked as llama-server checks them, and the prompt they
render (for /v1/chat/completions and /apply-template alike).

- ``add_generation_prompt`` (default true) and ``continue_final_message`` (default false, Hugging
  Face's: the reply continues the last message, which must be the assistant's) exclude each other.
- A last assistant message without ``continue_final_message`` is llama-server's prefill: the
  conversation before it is rendered with the generation prompt and its text appended; two
  assistant messages at the end, or a prefill while the template thinks, are 400s.
- ``chat_template_kwargs`` (over ``--chat-template-kwargs``) become template variables;
  ``enable_thinking`` is always passed (false with ``--reasoning-budget 0``, else true, unless the
  kwargs set it: a boolean).
- ``reasoning_format`` (over ``--reasoning-format``) says how the reply's thinking is split out;
  the prompt says whether the template already opened the ``<think>`` block.
- As llama.cpp: the BOS text a template writes first is dropped when the tokenizer adds BOS
  itself, and a trailing EOS text when it adds EOS.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

from ..model.chat_template import ChatTemplateError, render_chat
from ..model.reasoning import REASONING_FORMATS, ReasoningSplitter, forced_open
from ..model.tokenizer import Tokenizer
from .errors import bad_request
from .state import ServerState


@dataclasses.dataclass
class ChatPrompt:
    text: str
    reasoning_format: str = "none"
    thinking_forced_open: bool = False

    def splitter(self) -> ReasoningSplitter:
        return ReasoningSplitter(self.reasoning_format, self.thinking_forced_open)


def _bool(body: dict, key: str, default: bool) -> bool:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad_request(f"'{key}' must be a boolean")
    return v


def special_texts(tok: Tokenizer) -> tuple[str, str]:
    return tok.token_text(tok.bos_id), tok.token_text(tok.eos_id)


def strip_specials(text: str, tok: Tokenizer) -> str:
    """The rendered text less the BOS / EOS text the tokenizer adds itself (llama.cpp's rule)."""
    bos, eos = special_texts(tok)
    if tok.add_bos and bos and text.startswith(bos):
        text = text[len(bos):]
    if tok.add_eos and eos and text.endswith(eos):
        text = text[:-len(eos)]
    return text


@functools.lru_cache(maxsize=8)
def supports_thinking(template: str) -> bool:
    """The template renders enable_thinking (llama.cpp's probe: one user message, generation
    prompt, enable_thinking true vs false)."""
    msgs = [{"role": "user", "content": "test"}]
    try:
        return render_chat(template, msgs, enable_thinking=True) != render_chat(template, msgs, enable_thinking=False)
    except ChatTemplateError:
        return False


def template_kwargs(state: ServerState, extra: dict[str, Any]) -> dict[str, Any]:
    """--chat-template-kwargs, the request's variables over them, and enable_thinking."""
    kw = {**state.settings.chat_template_kwargs, **extra}
    thinking = kw.get("enable_thinking", state.settings.reasoning_budget != 0)
    if not isinstance(thinking, bool):
        raise bad_request(f"invalid type for \"enable_thinking\" (expected boolean, got {type(thinking).__name__})")
    kw["enable_thinking"] = thinking
    return kw


def _render(state: ServerState, messages: list[dict], add_gen: bool, kw: dict[str, Any]) -> str:
    assert state.model is not None
    bos, eos = special_texts(state.model.tokenizer)
    try:
        return render_chat(state.chat_template, messages, add_generation_prompt=add_gen, bos_token=bos,
                           eos_token=eos, **kw)
    except ChatTemplateError as e:
        raise bad_request(str(e)) from None


def _continued(rendered: str, final: str) -> str:
    """Hugging Face's continue_final_message: the render cut right after the last message's text."""
    for needle in (final, final.strip()):
        if needle and needle in rendered:
            return rendered[:rendered.rindex(needle) + len(needle)]
    raise bad_request("continue_final_message is set but the final message does not appear in the chat "
                      "after applying the chat template")


def chat_prompt(state: ServerState, body: dict, messages: list[dict], extra: dict[str, Any]) -> ChatPrompt:
    """The prompt text for checked `messages` (see the module docstring); a bad combination is a 400."""
    assert state.model is not None
    add_gen = _bool(body, "add_generation_prompt", True)
    cont = _bool(body, "continue_final_message", False)
    if cont and body.get("add_generation_prompt") is True:
        raise bad_request("Cannot set both 'continue_final_message' and 'add_generation_prompt' to true")
    fmt = body.get("reasoning_format", state.settings.reasoning_format)
    if fmt not in REASONING_FORMATS:
        raise bad_request(f"'reasoning_format' must be one of {', '.join(REASONING_FORMATS)}")
    kw = template_kwargs(state, extra)
    last = messages[-1]
    if cont:
        if last["role"] != "assistant":
            raise bad_request("'continue_final_message' needs the last message to be the assistant's, "
                              f"not {last['role']!r}")
        text = _continued(_render(state, messages, False, kw), last["content"])
        fmt = "none"                        # the reply continues a message written outside the block
    elif last["role"] == "assistant":       # llama-server's prefill
        if len(messages) >= 2 and messages[-2]["role"] == "assistant":
            raise bad_request("Cannot have 2 or more assistant messages at the end of the list.")
        if kw["enable_thinking"] and supports_thinking(state.chat_template):
            raise bad_request("Assistant response prefill is incompatible with enable_thinking.")
        text = _render(state, messages[:-1], True, kw) + last["content"]
        fmt = "none"
    else:
        text = _render(state, messages, add_gen, kw)
    text = strip_specials(text, state.model.tokenizer)
    return ChatPrompt(text, fmt, fmt != "none" and add_gen and not cont and forced_open(text))
