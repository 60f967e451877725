"""Chat templates: the model's Jinja template (``tokenizer.chat_template``) rendered the way
Hugging Face ``apply_chat_template`` renders it, inside Jinja's immutable sandbox.

Templates come from model files, i.e. from strangers: the sandbox refuses dunder/internal
attribute access and mutation of the values passed in. Any template failure - a syntax error,
``raise_exception('...')`` from the template, a blocked access - is a ``ChatTemplateError``
(a ``ValueError``), which the API turns into a 400.
"""
from __future__ import annotations

import functools
import json
import logging
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .chat_builtin import BUILTIN_TEMPLATES, builtin_name, render_builtin

logger = logging.getLogger(__name__)

# used when the GGUF has no tokenizer.chat_template (llama.cpp falls back to ChatML too)
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


__all__ = ["BUILTIN_TEMPLATES", "CHATML_TEMPLATE", "ChatTemplateError", "render_chat"]


class ChatTemplateError(ValueError):
    """The chat template could not be compiled or rendered (message says why)."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(str(message))


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # like transformers: no HTML escaping (unlike Jinja's own tojson), unicode kept as is
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask marker): renders
    its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


@functools.lru_cache(maxsize=1)
def _env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    try:
        return _env().from_string(template)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template does not compile: {e}") from e


def render_chat(template: str | None, messages: list[dict], add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", **extra: Any) -> str:
    """Render ``messages`` (OpenAI-style dicts) with ``template``; ``None``/"" uses ChatML; a
    llama.cpp built-in name (``gemma``, ``llama3``, ... see chat_builtin.py) renders that template.

    ``extra`` becomes template variables (``tools``, ``documents``, ``enable_thinking``, ...).
    """
    if not template:
        template = CHATML_TEMPLATE
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ChatTemplateError("messages must be a list of objects")
    name = builtin_name(template)
    if name is not None:
        return render_builtin(name, messages, add_generation_prompt)
    compiled = _compile(template)
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, **extra)
    except ChatTemplateError:
        raise
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError,
            ZeroDivisionError, OverflowError, RecursionError) as e:
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
