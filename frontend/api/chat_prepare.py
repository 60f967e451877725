"""One chat request (an OpenAI chat-completions body) -> what the engine runs: the tool spec, the
task parameters with the structured-output / tool-call grammar, and the rendered prompt's tokens.

/v1/chat/completions uses it directly; /v1/responses and /v1/messages convert their bodies to
this shape first (as llama-server does) and share everything from here on: the template, the
sampling fields, the tool calls and the grammars, then `reply_parts` to read the output. The
template options (add_generation_prompt, continue_final_message, reasoning) are chat_request's."""
from __future__ import annotations

import dataclasses
from typing import Any

from ..engine import STOP_LIMIT, FinalEvent, TaskParams
from .chat import parse_messages, template_extra
from .chat_request import ChatPrompt, chat_prompt
from .checks import encode_chat_off_loop
from .errors import bad_request
from .params import check_context, task_params
from .schemas import ChatRequest
from .state import ServerState
from .structured import lark_grammar, response_format_grammar, schema_grammar
from .tools import ToolSpec, generic_schema, hermes_lark, parse_output, parse_tools, prepare_messages, template_tools


@dataclasses.dataclass
class PreparedChat:
    spec: ToolSpec | None       # None: no tool may be called
    params: TaskParams
    prompt: list[int]
    rendered: ChatPrompt        # the prompt's text and how the reply's thinking is split out


async def chat_tokens(st: ServerState, body: dict[str, Any], spec: ToolSpec | None) -> tuple[ChatPrompt, list[int]]:
    """The messages (and tools) through the chat template, tokenized off the event loop and
    checked against a slot's context."""
    assert st.model is not None and st.engine is not None
    messages = prepare_messages(parse_messages(body.get("messages")), spec, st.chat_template)
    extra = template_extra(body)
    extra.pop("tools", None)
    extra.update(template_tools(spec))
    rendered = chat_prompt(st, body, messages, extra)
    prompt = await encode_chat_off_loop(st.model.tokenizer, rendered.text, st.engine.n_ctx_slot)
    if not prompt:
        raise bad_request("the chat template rendered an empty prompt")
    return rendered, prompt


def chat_params(st: ServerState, r: ChatRequest, body: dict[str, Any], spec: ToolSpec | None,
                allow_n: bool = False) -> TaskParams:
    """The sampling fields, with `response_format` or the tool-call format as the grammar."""
    params = task_params(r, st, oai_chat=True, allow_n=allow_n)
    grammar = response_format_grammar(body.get("response_format"), st)
    if spec is not None:
        if grammar is not None:
            raise bad_request("'response_format' cannot be combined with 'tools'")
        if not spec.native:
            grammar = schema_grammar("tools", generic_schema(spec), st)
        elif spec.forced:
            grammar = lark_grammar("tools", hermes_lark(spec), st)
    if grammar is not None:
        if params.sampling.grammar is not None:
            raise bad_request("'response_format'/'tools' and 'grammar'/'json_schema' cannot be used together")
        params = dataclasses.replace(params, sampling=dataclasses.replace(params.sampling, grammar=grammar))
    return params


async def prepare_chat(st: ServerState, r: ChatRequest, allow_n: bool = False) -> PreparedChat:
    """`allow_n`: the route runs `n` choices (/v1/chat/completions); elsewhere n > 1 is a 400."""
    body = r.fields()
    spec = parse_tools(body, st.chat_template)
    params = chat_params(st, r, body, spec, allow_n)
    rendered, prompt = await chat_tokens(st, body, spec)
    assert st.engine is not None
    check_context([prompt], params, st.engine.n_ctx_slot)
    return PreparedChat(spec, params, prompt, rendered)


def reply_parts(f: FinalEvent, spec: ToolSpec | None) -> tuple[str, list[dict]]:
    """(text, OpenAI-shaped tool calls) of a finished generation; output that does not parse as
    tool calls stays text."""
    if spec is None:
        return f.content, []
    content, calls = parse_output(f.content, spec)
    return content or "", calls


def cut_by_length(f: FinalEvent) -> bool:
    return f.stop_type == STOP_LIMIT
