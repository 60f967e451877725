"""Chat templates: the model's Jinja template (``tokenizer.chat_template``) rendered the way
Hugging Face ``apply_chat_template`` renders it, inside Jinja's immutable sandbox.

Templates come from model files, i.e. from strangers: the sandbox refuses dunder/internal
attribute access and mutation of the values passed in. Any template failure - a syntax error,
``raise_exception('...')`` from the template, a blocked access - is a ``ChatTemplateError``
(a ``ValueError``), which the API turns into a 400.

As llama.cpp's jinja engine: an undefined variable is falsy and renders as nothing, its attributes
and items are undefined too, it iterates as empty and concatenates as ""; the template gets
``strftime_now(fmt)``, ``date_string`` ("01 Dec 2026") and ``datetime`` ("Dec 01 2026").
"""
from __future__ import annotations

import functools
import json
import logging
import re
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


__all__ = ["BUILTIN_TEMPLATES", "CHATML_TEMPLATE", "ChatTemplateError", "check_template", "render_chat",
           "template_error"]
_SHORT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class ChatTemplateError(ValueError):
    """The chat template could not be compiled or rendered (message says why)."""


class LenientUndefined(jinja2.ChainableUndefined):
    """llama.cpp's undefined: falsy, renders and concatenates as "", attributes/items undefined.
    What the sandbox refused (an unsafe attribute) stays an error when it is used further."""

    def __getattr__(self, name: str) -> Any:
        if name[:2] == "__":
            raise AttributeError(name)
        return self[name]

    def __getitem__(self, key: Any) -> Any:
        if self._undefined_exception is not jinja2.UndefinedError:     # the sandbox's SecurityError
            self._fail_with_undefined_error()
        return self

    def __add__(self, other: Any) -> Any:
        return other if isinstance(other, str) else super().__add__(other)

    def __radd__(self, other: Any) -> Any:
        return other if isinstance(other, str) else super().__radd__(other)


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
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=LenientUndefined,
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


def template_error(template: str) -> str | None:
    """Why the jinja `template` does not compile, or None."""
    try:
        _compile(template)
    except ChatTemplateError as e:
        return str(e)
    return None


def check_template(template: str) -> str:
    """A --chat-template / --chat-template-file value checked at startup: a built-in name (returned
    stripped), else a jinja template that must compile. A short name that is neither is an error
    naming the built-in ones."""
    name = builtin_name(template)
    if name is not None:
        return name
    if _SHORT_NAME.fullmatch(template.strip()):
        raise ChatTemplateError(f"unknown chat template name {template.strip()!r}; the built-in ones are: "
                                + ", ".join(BUILTIN_TEMPLATES) + " (anything else is read as a jinja template)")
    _compile(template)
    return template


def _dates() -> dict[str, str]:
    now = datetime.now()
    return {"date_string": now.strftime("%d %b %Y"), "datetime": now.strftime("%b %d %Y")}


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
        return compiled.render(**{"messages": messages, "add_generation_prompt": add_generation_prompt,
                                  "bos_token": bos_token, "eos_token": eos_token, **_dates(), **extra})
    except ChatTemplateError:
        raise
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError,
            ZeroDivisionError, OverflowError, RecursionError) as e:
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
