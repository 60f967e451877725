"""Structured output over HTTP on the tiny synthetic model (random weights: whatever is valid
comes from the grammar): /completion `grammar` and `json_schema`, OpenAI `response_format`,
streamed and not, a stream cut by n_predict ending with "length", and a constrained request
decoding in the same batch as an unconstrained one. (The real model: tests/test_structured_real.py.)"""
from __future__ import annotations

import json
import re
import threading

import httpx
import jsonschema
import pytest
from serverproc import sse_events, start_server
from synth import write_model

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "pattern": "^[a-z]{1,6}$"},
    "age": {"type": "integer", "minimum": 0, "maximum": 99},
    "ok": {"type": "boolean"},
    "color": {"enum": ["red", "green", "blue"]},
    "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "minItems": 1, "maxItems": 3}},
    "required": ["name", "age", "ok", "color", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("structured") / "synth.gguf"
    write_model(path)
    srv, url = start_server(["-m", str(path), "-c", "2048", "-np", "2"])
    yield srv, url
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server[1], timeout=60) as c:
        yield c


def test_gbnf_choice(http):
    seen = set()
    for seed in range(4):
        r = http.post("/completion", json={"prompt": "Q:", "grammar": 'root ::= "yes" | "no"', "seed": seed,
                                           "n_predict": 16, "temperature": 1.0}).json()
        assert r["content"] in ("yes", "no") and r["stop_type"] == "eos"
        assert r["generation_settings"]["grammar"] == 'root ::= "yes" | "no"'
        seen.add(r["content"])
    assert seen == {"yes", "no"}


def test_json_schema_streamed_and_not(http):
    body = {"prompt": "Person:", "json_schema": SCHEMA, "n_predict": 160, "temperature": 0}
    whole = http.post("/completion", json=body).json()
    jsonschema.validate(json.loads(whole["content"]), SCHEMA)
    with http.stream("POST", "/completion", json={**body, "stream": True}) as r:
        evs = [e for e in sse_events(r.iter_lines()) if isinstance(e, dict)]
    assert "".join(e["content"] for e in evs) == whole["content"] and evs[-1]["stop_type"] == "eos"


def test_response_format(http):
    msgs = [{"role": "user", "content": "Give me JSON."}]
    r = http.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 160, "temperature": 0, "response_format": {
        "type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": SCHEMA}}}).json()
    jsonschema.validate(json.loads(r["choices"][0]["message"]["content"]), SCHEMA)
    assert r["choices"][0]["finish_reason"] == "stop"
    obj = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False}
    r = http.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 60, "temperature": 0,
                                                "response_format": {"type": "json_object", "schema": obj}}).json()
    assert isinstance(json.loads(r["choices"][0]["message"]["content"])["a"], int)


def test_cut_by_n_predict_is_length(http):
    body = {"messages": [{"role": "user", "content": "JSON"}], "max_tokens": 4, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        chunks = [e for e in sse_events(r.iter_lines()) if isinstance(e, dict)]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert text.startswith('{"n')
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_constrained_and_free_requests_share_a_batch(server, monkeypatch):
    srv, url = server
    pipeline = srv.state.engine.model.pipeline
    forward = pipeline.forward
    seqs: list[set[int]] = []

    def spy(tokens, pos, seq, cells, kv_pos, kv_seq, out_rows):
        seqs.append({int(s) for s in seq})
        return forward(tokens, pos, seq, cells, kv_pos, kv_seq, out_rows)

    monkeypatch.setattr(pipeline, "forward", spy)
    out: dict[str, str] = {"free": ""}
    streaming, done = threading.Event(), threading.Event()

    def free() -> None:     # streams until the constrained request is done, then hangs up (cancels)
        with httpx.stream("POST", url + "/completion", timeout=60, json={
                "prompt": "free:", "n_predict": 1000, "ignore_eos": True, "temperature": 0, "cache_prompt": False,
                "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    out["free"] += json.loads(line[6:])["content"]
                    streaming.set()
                if done.is_set():
                    return

    # the constrained request starts once the free one streams, and the free one runs until it is
    # done: its decode steps all fall inside the free one's, however long the grammar takes to compile
    t = threading.Thread(target=free)
    t.start()
    assert streaming.wait(60)
    r = httpx.post(url + "/completion", timeout=60, json={
        "prompt": "lower:", "n_predict": 40, "ignore_eos": True, "temperature": 0, "cache_prompt": False,
        "grammar": "root ::= [a-z]+"})
    out["lower"] = r.json()["content"]
    done.set()
    t.join(60)
    assert re.fullmatch("[a-z]{40,}", out["lower"]) and not re.fullmatch("[a-z]*", out["free"])
    assert sum(len(s) == 2 for s in seqs) >= 35       # the constrained request's decode steps carried both


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Za-z]{1,8}$"},
                                     "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
NOOP = {"type": "function", "function": {"name": "noop"}}


@pytest.mark.parametrize("parallel", [False, True])
def test_forced_tool_call(http, parallel):
    body = {"messages": [{"role": "user", "content": "weather?"}], "tools": [WEATHER, NOOP], "max_tokens": 120,
            "temperature": 0, "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "parallel_tool_calls": parallel}
    r = http.post("/v1/chat/completions", json=body).json()
    ch = r["choices"][0]
    assert ch["finish_reason"] == "tool_calls" and ch["message"]["content"] is None
    (call,) = ch["message"]["tool_calls"]       # a named function: one call
    assert call["type"] == "function" and call["function"]["name"] == "get_weather" and call["id"].startswith("call_")
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
        chunks = [e for e in sse_events(s.iter_lines()) if isinstance(e, dict)]
    deltas = [tc for c in chunks if c["choices"] for tc in c["choices"][0]["delta"].get("tool_calls") or []]
    assert deltas[0]["function"]["name"] == "get_weather" and deltas[0]["index"] == 0
    assert "".join(d["function"]["arguments"] for d in deltas) == call["function"]["arguments"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_history_renders_as_generic_json(http):
    """ChatML (the synthetic model's template) has no tool support: the tools go in the system
    prompt, assistant calls and tool results become llama.cpp's generic JSON."""
    from llamarpc.frontend.api.tools import parse_tools, prepare_messages
    msgs = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "cold"}]
    spec = parse_tools({"tools": [WEATHER]}, None)
    out = prepare_messages(msgs, spec, None)
    assert out[0]["role"] == "system" and "get_weather" in out[0]["content"] and "`tool_call`" in out[0]["content"]
    assert json.loads(out[2]["content"]) == {"tool_call": {"name": "get_weather", "arguments": {"city": "Oslo"},
                                                           "id": "call_1"}}
    assert out[3] == {"role": "user", "content": json.dumps(
        {"tool_response": {"tool": "", "content": "cold", "tool_call_id": "call_1"}})}
    r = http.post("/v1/chat/completions", json={"messages": msgs, "tools": [WEATHER], "tool_choice": "none",
                                                "max_tokens": 4}).json()
    assert r["choices"][0]["finish_reason"] == "length" and "tool_calls" not in r["choices"][0]["message"]


@pytest.mark.parametrize("extra, needle", [
    ({"tools": "x"}, "'tools'"),
    ({"tools": [{"type": "function", "function": {}}]}, "name"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
    ({"tool_choice": "required"}, "requires 'tools'"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "combined"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]}, "'tools'"),
])
def test_bad_tools_are_400(http, extra, needle):
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], **extra})
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


def test_native_template_format(tmp_path):
    """A template that renders `tools` itself gets them as HF passes them; its Hermes-style output
    is parsed, and a forced call's grammar (Lark with the tools' schemas) compiles and holds."""
    from llamarpc.frontend.api.tools import hermes_lark, parse_output, parse_tools, template_tools
    from llamarpc.frontend.model.tokenizer import Tokenizer
    from llamarpc.frontend.sampling.constraint import Grammar, ll_tokenizer
    template = "{% for t in tools %}{{ t.function.name }}{% endfor %}<tool_call>"
    spec = parse_tools({"tools": [WEATHER], "tool_choice": "required"}, template)
    assert spec.native and template_tools(spec)["tools"][0]["function"]["name"] == "get_weather"
    text = 'ok <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call>'
    content, calls = parse_output(text, spec)
    assert content == "ok" and calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo", "unit": "c"}
    write_model(tmp_path / "m.gguf")
    tok = Tokenizer.from_gguf(str(tmp_path / "m.gguf"))
    c = Grammar.from_lark(hermes_lark(spec), ll_tokenizer(tok)).start()
    for t in tok.encode(text[3:], add_special=False):
        assert c.accept(t)
    assert c.accepting
