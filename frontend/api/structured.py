"""Structured output: a request's `grammar` / `json_schema` (llama.cpp's /completion fields) and
OpenAI's `response_format` -> a checked Grammar for the sampler. A grammar or schema that does
not compile is a 400 naming the field and the problem."""
from __future__ import annotations

import logging
import time
from typing import Any

from ..sampling.constraint import Grammar, GrammarError, ll_tokenizer
from .errors import bad_request
from .state import ServerState

log = logging.getLogger(__name__)
GRAMMAR_MODE = "check"      # or "mask": see frontend/sampling/constraint.py and scripts/bench_constraint.py


def vocab(state: ServerState):  # noqa: ANN201 - llguidance.LLTokenizer
    assert state.model is not None
    return ll_tokenizer(state.model.tokenizer, state.model.n_vocab)


def _compile(field: str, make: Any, arg: Any, state: ServerState) -> Grammar:
    t0 = time.perf_counter()
    try:
        g = make(arg, vocab(state), GRAMMAR_MODE)
    except GrammarError as e:
        raise bad_request(f"'{field}': {e}") from None
    log.debug("%s compiled in %.1f ms", field, 1e3 * (time.perf_counter() - t0))
    return g


def schema_grammar(field: str, schema: Any, state: ServerState) -> Grammar:
    return _compile(field, Grammar.from_json_schema, schema, state)


def gbnf_grammar(field: str, text: Any, state: ServerState) -> Grammar:
    if not isinstance(text, str):
        raise bad_request(f"'{field}' must be a string")
    return _compile(field, Grammar.from_gbnf, text, state)


def lark_grammar(field: str, text: str, state: ServerState) -> Grammar:
    return _compile(field, Grammar.from_lark, text, state)


def completion_grammar(grammar: str | None, schema: Any, state: ServerState) -> Grammar | None:
    """/completion's `grammar` (GBNF) or `json_schema`; both at once is an error, as in llama.cpp."""
    has_grammar = grammar not in (None, "")
    has_schema = schema is not None
    if has_grammar and has_schema:
        raise bad_request('Either "json_schema" or "grammar" can be specified, but not both')
    if has_schema:
        return schema_grammar("json_schema", schema, state)
    if has_grammar:
        return gbnf_grammar("grammar", grammar, state)
    return None


def response_format_grammar(rf: Any, state: ServerState) -> Grammar | None:
    """OpenAI's response_format: {"type": "text"}, {"type": "json_object"} (any JSON object, or
    the `schema` given with it, as llama.cpp takes), {"type": "json_schema", "json_schema":
    {"name", "schema", "strict"}}."""
    if rf is None:
        return None
    if not isinstance(rf, dict):
        raise bad_request("'response_format' must be an object")
    kind = rf.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        schema = rf.get("schema")
        return schema_grammar("response_format.schema", schema if schema is not None else {"type": "object"}, state)
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise bad_request("'response_format.json_schema' must be an object")
        schema = js.get("schema", rf.get("schema"))
        if schema is None:
            raise bad_request("'response_format.json_schema.schema' is required")
        return schema_grammar("response_format.json_schema.schema", schema, state)
    raise bad_request(f"'response_format.type' must be one of \"text\", \"json_object\" or \"json_schema\", got {kind!r}")
