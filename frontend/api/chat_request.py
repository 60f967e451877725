"""A chat request's template options, checked as llama-server checks them, and the prompt they
render (for /v1/chat/completions and /apply-template alike).

- ``add_generation_prompt`` (default true).
- ``continue_final_message`` (true, "content" or "reasoning_content"): the reply continues the last
  message, which must be the assistant's and carry no tool calls; not with add_generation_prompt
  true (so it needs ``add_generation_prompt: false``). A last assistant message without it is
  llama-server's prefill, the same continuation; two assistant messages at the end are a 400.
  As llama.cpp (common/chat.cpp): the conversation before it is rendered, then the template's
  generation prompt, and for a template with thinking tags ``<think>`` + its reasoning_content,
  then (continuing the content) ``</think>`` + its content. True means the reasoning when the
  message has reasoning_content and no content, else the content.
- ``chat_template_kwargs`` (over ``--chat-template-kwargs``) become template variables;
  ``enable_thinking`` is always passed (false with ``--reasoning-budget 0`` or ``reasoning_effort:
  "none"``, else true, unless the kwargs set it: a boolean).
- ``reasoning_format`` (over ``--reasoning-format``) says how the reply's thinking is split out,
  for a template with thinking tags (for another, as in llama.cpp, the reply is all content); the
  prompt says whether generation starts inside the ``<think>`` block.
- As llama.cpp: the BOS text a template writes first is dropped when the tokenizer adds BOS
  itself, and a trailing EOS text when it adds EOS.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

from ..model.chat_template import ChatTemplateError, render_chat
from ..model.reasoning import REASONING_FORMATS, THINK_END, THINK_START, ReasoningSplitter, forced_open
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


def thinks(template: str) -> bool:
    """The template has thinking tags (writes or reads ``<think>...</think>``, or renders
    enable_thinking): only then is a reply's reasoning split out, as llama.cpp's template analysis
    decides."""
    return (THINK_START in template and THINK_END in template) or supports_thinking(template)


def template_kwargs(state: ServerState, body: dict, extra: dict[str, Any]) -> dict[str, Any]:
    """--chat-template-kwargs, the request's variables over them, and enable_thinking; OpenAI's
    ``reasoning_effort`` "none" turns thinking off, another level is passed to the template."""
    kw = {**state.settings.chat_template_kwargs, **extra}
    thinking = kw.get("enable_thinking", state.settings.reasoning_budget != 0)
    if not isinstance(thinking, bool):
        raise bad_request(f"invalid type for \"enable_thinking\" (expected boolean, got {type(thinking).__name__})")
    kw["enable_thinking"] = thinking
    effort = body.get("reasoning_effort")
    if effort is not None and not isinstance(effort, str):
        raise bad_request("'reasoning_effort' must be a string")
    if effort == "none":
        kw["enable_thinking"] = False
        kw.pop("reasoning_effort", None)
    elif effort:
        kw["reasoning_effort"] = effort
    return kw


def _render(state: ServerState, messages: list[dict], add_gen: bool, kw: dict[str, Any]) -> str:
    assert state.model is not None
    bos, eos = special_texts(state.model.tokenizer)
    try:
        return render_chat(state.chat_template, messages, add_generation_prompt=add_gen, bos_token=bos,
                           eos_token=eos, **kw)
    except ChatTemplateError as e:
        raise bad_request(str(e)) from None


def _continuation(body: dict) -> str:
    v = body.get("continue_final_message")
    if v is None or v is False:
        return "none"
    if v is True:
        return "auto"
    if v in ("content", "reasoning_content"):
        return "content" if v == "content" else "reasoning"
    raise bad_request("'continue_final_message' must be true, false, \"content\" or \"reasoning_content\"")


def _continue(state: ServerState, messages: list[dict], mode: str, kw: dict[str, Any]) -> tuple[str, bool]:
    """The prompt that continues messages[-1] (see the module docstring), and whether it ends
    inside the thinking block."""
    last, before = messages[-1], messages[:-1]
    if last["role"] != "assistant":
        raise bad_request(f"'continue_final_message' needs the last message to be the assistant's, not {last['role']!r}")
    if last.get("tool_calls"):
        raise bad_request("Cannot continue an assistant message that contains tool calls.")
    reasoning = last.get("reasoning_content") or ""
    if mode == "auto":
        mode = "reasoning" if reasoning and not last["content"] else "content"
    head, full = _render(state, before, False, kw), _render(state, before, True, kw)
    head, gen = (head, full[len(head):]) if full.startswith(head) else ("", full)
    tags = thinks(state.chat_template)
    if tags:
        if THINK_START in gen:
            gen = gen[:gen.index(THINK_START)]
        gen += THINK_START + reasoning + (THINK_END if mode == "content" else "")
    return head + gen + (last["content"] if mode == "content" else ""), tags and mode == "reasoning"


def chat_prompt(state: ServerState, body: dict, messages: list[dict], extra: dict[str, Any]) -> ChatPrompt:
    """The prompt text for checked `messages` (see the module docstring); a bad combination is a 400."""
    assert state.model is not None
    add_gen = _bool(body, "add_generation_prompt", True)
    cont = _continuation(body)
    if cont == "none" and messages[-1]["role"] == "assistant":       # llama-server's prefill
        if len(messages) >= 2 and messages[-2]["role"] == "assistant":
            raise bad_request("Cannot have 2 or more assistant messages at the end of the list.")
        cont, add_gen = "auto", False
    if cont != "none" and add_gen:
        raise bad_request("Cannot set both add_generation_prompt and continue_final_message to true.")
    fmt = body.get("reasoning_format", state.settings.reasoning_format)
    if fmt not in REASONING_FORMATS:
        raise bad_request(f"'reasoning_format' must be one of {', '.join(REASONING_FORMATS)}")
    if not thinks(state.chat_template):
        fmt = "none"                        # a template without thinking: the reply is all content
    kw = template_kwargs(state, body, extra)
    if cont != "none":
        text, inside = _continue(state, messages, cont, kw)
        # continuing the content: the block (if any) is closed; continuing the reasoning: inside it
        opened = fmt != "none" and inside
        return ChatPrompt(strip_specials(text, state.model.tokenizer), fmt if opened else "none", opened)
    text = strip_specials(_render(state, messages, add_gen, kw), state.model.tokenizer)
    return ChatPrompt(text, fmt, fmt != "none" and add_gen and forced_open(text))
