"""/v1/responses (OpenAI Responses) and /v1/messages, /v1/messages/count_tokens (Anthropic) on a
tiny synthetic model: the request conversions, the reply and stream shapes, the same output as
/v1/chat/completions, stops, forced tool calls, auth by x-api-key, errors in each API's shape.
(The official SDKs on the real model: tests/test_endpoints_real.py.)"""
from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llamarpc.frontend.api import routes_messages, routes_responses
from llamarpc.frontend.api.chat import parse_messages
from llamarpc.frontend.api.errors import APIError, error_body
from llamarpc.frontend.api.schemas import MessagesRequest, ResponsesRequest, validated
from llamarpc.frontend.api.stream import sse_event
from llamarpc.frontend.api.tools import parse_tools, prepare_messages
from llamarpc.frontend.model.chat_template import CHATML_TEMPLATE
from serverproc import start_server
from synth import write_model

KEY = "sk-endpoints"
GREEDY = {"temperature": 0, "ignore_eos": True}
ASK = "Tell me a story"
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
           "additionalProperties": False}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("endpoints") / "synth.gguf"
    write_model(path, n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=256, seed=3)
    srv, url = start_server(["-m", str(path), "-c", "4096", "-np", "2", "-a", "synth", "--api-key", KEY])
    yield url
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, timeout=60, headers={"x-api-key": KEY}) as c:
        yield c


def chat_text(http, n: int) -> str:
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": ASK}], "max_tokens": n,
                                                **GREEDY})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def named_events(r: httpx.Response) -> list[dict]:
    """A named-event SSE body -> the data objects, each checked to carry its event's name."""
    out, name = [], None
    for line in r.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
            assert data["type"] == name, (name, data)
            out.append(data)
            name = None
    return out


def responses_chat(body):
    """A Responses body as the route reads it: the schema's validation, then the conversion."""
    return routes_responses.to_chat_body(validated(ResponsesRequest, body).fields())


def messages_chat(body, count_tokens=False):
    return routes_messages.to_chat_body(validated(MessagesRequest, body).fields(), count_tokens)


def bad(fn, *args):
    with pytest.raises(APIError) as e:
        fn(*args)
    assert e.value.code == 400
    return e.value.message


# -- the conversions --------------------------------------------------------------------------------
def test_responses_body_to_chat():
    chat = responses_chat({
        "instructions": "Be brief.", "max_output_tokens": 7, "top_k": 3, "store": True,
        "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
        "tool_choice": {"type": "function", "name": "f"},
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
                  {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "c"}]},
                  {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                  {"type": "function_call", "call_id": "c2", "name": "f", "arguments": "{\"x\": 1}"},
                  {"type": "function_call_output", "call_id": "c2", "output": "done"}]})
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "c"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "c2", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
        {"role": "tool", "tool_call_id": "c2", "name": "f", "content": "done"}]
    assert chat["max_tokens"] == 7 and chat["top_k"] == 3 and "store" not in chat
    assert chat["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": False}}
    assert chat["tools"] == [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert responses_chat({"input": "hi"})["messages"] == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body, word", [
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "only text parts"),
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "only function tools"),
    ({"input": []}, "'input'"),
    ({"input": [{"role": "tool", "content": "x"}]}, "role"),
    ({"input": "x", "text": {"format": {"type": "xml"}}}, "text.format.type"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
])
def test_responses_body_refused(body, word):
    assert word in bad(responses_chat, body)


def test_messages_body_to_chat():
    chat = messages_chat({
        "system": [{"type": "text", "text": "S1"}, {"type": "text", "text": "S2"}], "max_tokens": 9,
        "stop_sequences": ["END"], "top_k": 5, "metadata": {"user_id": "u"},
        "tools": [{"name": "f", "description": "d", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "tool", "name": "f"},
        "messages": [{"role": "user", "content": "hi"},
                     {"role": "assistant", "content": [{"type": "text", "text": "let me"},
                                                       {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                                   "content": [{"type": "text", "text": "ok"}]},
                                                  {"type": "text", "text": "and?"}]}]})
    assert chat["messages"] == [
        {"role": "system", "content": "S1S2"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "let me",
         "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
        {"role": "user", "content": "and?"}, {"role": "tool", "tool_call_id": "t1", "name": "f", "content": "ok"}]
    assert chat["max_tokens"] == 9 and chat["stop"] == ["END"] and chat["top_k"] == 5 and "metadata" not in chat
    assert chat["tools"] == [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"},
                                                               "description": "d"}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    one = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    assert messages_chat({**one, "tool_choice": {"type": "any"}})["tool_choice"] == "required"
    assert messages_chat({**one, "tool_choice": {"type": "none"}})["tool_choice"] == "none"
    assert "max_tokens" not in messages_chat({"messages": one["messages"]}, count_tokens=True)


@pytest.mark.parametrize("body, word", [
    ({"messages": [{"role": "user", "content": "x"}]}, "'max_tokens' is required"),
    ({"messages": [{"role": "system", "content": "x"}], "max_tokens": 1}, "role"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}], "max_tokens": 1}, "not supported"),
    ({"messages": [], "max_tokens": 1}, "'messages'"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "tool_choice": {"type": "maybe"}},
     "tool_choice.type"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "tools": [{"type": "bash_20250124"}]},
     "client tool"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "system": 3}, "'system'"),
])
def test_messages_body_refused(body, word):
    assert word in bad(messages_chat, body)


# -- /v1/responses ----------------------------------------------------------------------------------
def test_responses_reply_is_the_chat_output(http):
    r = http.post("/v1/responses", json={"input": ASK, "max_output_tokens": 6, "model": "m", **GREEDY})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "response" and body["id"].startswith("resp_") and body["model"] == "m"
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    [item] = body["output"]
    assert item["type"] == "message" and item["role"] == "assistant" and item["status"] == "completed"
    assert item["content"][0]["type"] == "output_text"
    assert item["content"][0]["text"] == body["output_text"] == chat_text(http, 6)
    u = body["usage"]
    assert u["output_tokens"] == 6 and u["input_tokens"] > 0 and u["total_tokens"] == u["input_tokens"] + 6


def test_responses_stream_events(http):
    req = {"input": [{"role": "user", "content": [{"type": "input_text", "text": ASK}]}], "max_output_tokens": 8,
           "stream": True, **GREEDY}
    with http.stream("POST", "/v1/responses", json=req) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = named_events(r)
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert len({e["response"]["id"] for e in events if "response" in e}) == 1
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == events[-4]["text"] == events[-1]["response"]["output_text"] == chat_text(http, 8)
    assert events[-1]["response"]["usage"]["output_tokens"] == 8
    assert events[2]["item"]["id"] == events[-2]["item"]["id"] == events[-1]["response"]["output"][0]["id"]


def test_responses_forced_function_call(http):
    tools = [{"type": "function", "name": "weather", "parameters": WEATHER}]
    req = {"input": "Weather?", "tools": tools, "tool_choice": "required", "max_output_tokens": 120, **GREEDY}
    r = http.post("/v1/responses", json=req)
    assert r.status_code == 200, r.text
    [call] = r.json()["output"]
    assert call["type"] == "function_call" and call["name"] == "weather" and call["call_id"].startswith("call_")
    assert json.loads(call["arguments"])["city"] in ("Paris", "Rome")
    with http.stream("POST", "/v1/responses", json={**req, "stream": True}) as s:
        events = named_events(s)
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    assert events[3]["delta"] == events[4]["arguments"] == events[5]["item"]["arguments"]
    assert json.loads(events[4]["arguments"]) == json.loads(call["arguments"])


def test_responses_errors_in_openai_shape(http):
    r = http.post("/v1/responses", json={"input": "x", "previous_response_id": "resp_x"})
    assert r.status_code == 400 and "type" not in r.json()
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert http.post("/v1/responses", json={"input": "x", "text": {"format": {"type": "json_schema",
                                                                            "schema": {"type": 7}}}}).status_code == 400


# -- /v1/messages -----------------------------------------------------------------------------------
def test_messages_reply_is_the_chat_output(http):
    r = http.post("/v1/messages", json={"model": "m", "max_tokens": 6, "messages": [{"role": "user", "content": ASK}],
                                        **GREEDY})
    assert r.status_code == 200, r.text
    m = r.json()
    assert m["type"] == "message" and m["role"] == "assistant" and m["id"].startswith("msg_") and m["model"] == "m"
    assert m["content"] == [{"type": "text", "text": chat_text(http, 6)}]
    assert m["stop_reason"] == "max_tokens" and m["stop_sequence"] is None
    assert m["usage"]["output_tokens"] == 6
    n = http.post("/v1/messages/count_tokens", json={"messages": [{"role": "user", "content": ASK}]})
    u = m["usage"]
    assert n.status_code == 200 and n.json() == {"input_tokens": u["input_tokens"] + u["cache_read_input_tokens"]}


def test_messages_stop_sequence(http):
    whole = chat_text(http, 16)
    word = next(whole[i:i + 3] for i in range(2, 12) if whole.find(whole[i:i + 3]) == i and whole[i:i + 3].strip())
    r = http.post("/v1/messages", json={"max_tokens": 16, "stop_sequences": ["@@never", word],
                                        "messages": [{"role": "user", "content": ASK}], **GREEDY})
    m = r.json()
    assert m["stop_reason"] == "stop_sequence" and m["stop_sequence"] == word
    assert m["content"][0]["text"] == whole[:whole.find(word)]


def test_messages_stream_events(http):
    req = {"max_tokens": 8, "stream": True, "messages": [{"role": "user", "content": [{"type": "text", "text": ASK}]}],
           **GREEDY}
    expected = chat_text(http, 8)           # (and the prompt is in a slot's cache)
    with http.stream("POST", "/v1/messages", json=req) as r:
        assert r.status_code == 200
        events = named_events(r)
    kinds = [e["type"] for e in events]
    assert kinds[:3] == ["message_start", "content_block_start", "ping"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[3:-3]) == {"content_block_delta"}
    text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
    assert text == expected
    assert events[-2]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert events[-2]["usage"]["output_tokens"] == 8
    start = events[0]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["input_tokens"] > 0
    u = events[-2]["usage"]     # the same prompt again: read from the cache, counted apart
    assert u["cache_read_input_tokens"] > 0 and u["input_tokens"] + u["cache_read_input_tokens"] == \
        start["usage"]["input_tokens"]


def test_messages_forced_tool_use(http):
    req = {"max_tokens": 120, "tools": [{"name": "weather", "input_schema": WEATHER}],
           "tool_choice": {"type": "tool", "name": "weather"}, "messages": [{"role": "user", "content": "Weather?"}],
           **GREEDY}
    m = http.post("/v1/messages", json=req).json()
    assert m["stop_reason"] == "tool_use", m
    [use] = m["content"]
    assert use["type"] == "tool_use" and use["name"] == "weather" and use["id"].startswith("toolu_")
    assert use["input"]["city"] in ("Paris", "Rome")
    with http.stream("POST", "/v1/messages", json={**req, "stream": True}) as s:
        events = named_events(s)
    assert [e["type"] for e in events] == ["message_start", "ping", "content_block_start", "content_block_delta",
                                           "content_block_stop", "message_delta", "message_stop"]
    assert events[2]["content_block"] == {**use, "id": events[2]["content_block"]["id"], "input": {}}
    assert json.loads(events[3]["delta"]["partial_json"]) == use["input"]
    assert events[5]["delta"]["stop_reason"] == "tool_use"
    # the history with the call and its result renders, and counts more tokens than without it
    follow = {"messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": [use]},
                           {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use["id"],
                                                         "content": "sunny"}]}]}
    n1 = http.post("/v1/messages/count_tokens", json=follow).json()["input_tokens"]
    n0 = http.post("/v1/messages/count_tokens", json={"messages": follow["messages"][:1]}).json()["input_tokens"]
    assert n1 > n0 > 0


def test_messages_errors_in_anthropic_shape(http, server):
    r = http.post("/v1/messages", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"] == "'max_tokens' is required" and body["error"]["code"] == 400
    r = http.post("/v1/messages", content=b"{not json")
    assert r.status_code == 400 and r.json()["type"] == "error"
    r = http.post("/v1/messages", content=b'{"messages": ' + b"[" * 70 + b"]" * 70 + b"}")    # the body guard's
    assert r.status_code == 400 and r.json()["type"] == "error" and "nested" in r.json()["error"]["message"]
    r = httpx.post(server + "/v1/messages/count_tokens", json={"messages": [{"role": "user", "content": "x"}]},
                   headers={"x-api-key": "wrong"})
    assert r.status_code == 401 and r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "authentication_error"


def test_auth_by_x_api_key_or_bearer(server):
    body = {"messages": [{"role": "user", "content": "x"}]}
    assert httpx.post(server + "/v1/messages/count_tokens", json=body).status_code == 401
    for headers in ({"x-api-key": KEY}, {"Authorization": f"Bearer {KEY}"}):
        assert httpx.post(server + "/v1/messages/count_tokens", json=body, headers=headers).status_code == 200
        assert httpx.post(server + "/v1/responses", json={"input": "x", "max_output_tokens": 1},
                          headers=headers).status_code == 200
    r = httpx.post(server + "/v1/responses", json={"input": "x"})
    assert r.status_code == 401 and "type" not in r.json()      # OpenAI's shape off the Anthropic routes


# -- random bodies through the conversions: a dict or a 400, never another exception ----------------
_leaf = st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=6) | st.sampled_from(
    ["text", "input_text", "output_text", "tool_use", "tool_result", "function_call", "function_call_output",
     "message", "user", "assistant", "system", "function", "auto", "any", "tool", "json_schema", "c1"])
_json = st.recursive(_leaf, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.sampled_from(
    ["type", "role", "content", "text", "id", "name", "input", "tool_use_id", "call_id", "arguments", "output",
     "format", "schema", "input_schema", "parameters"]), kids, max_size=4), max_leaves=16)
_body = st.dictionaries(st.sampled_from(["input", "instructions", "messages", "system", "max_tokens",
                                         "max_output_tokens", "tools", "tool_choice", "text", "stop_sequences",
                                         "output_config", "previous_response_id"]), _json, max_size=5)


@settings(max_examples=150, deadline=None, database=None)
@given(_body, st.booleans())
def test_random_bodies_convert_or_400(body, count):
    """Through the conversion and on through the chat layer's message and tool checks."""
    for convert in (responses_chat, lambda b: messages_chat(b, count)):
        try:
            out = convert(body)
            assert any(m["role"] != "system" for m in out["messages"])
            spec = parse_tools(out, CHATML_TEMPLATE)
            prepare_messages(parse_messages(out["messages"]), spec, CHATML_TEMPLATE)
        except APIError as e:
            assert e.code == 400 and e.message


def test_named_sse_events():
    assert sse_event({"type": "ping"}) == 'event: ping\ndata: {"type": "ping"}\n\n'
    err = sse_event(error_body(503, "gone", "unavailable_error"))     # a mid-stream error, as both SDKs read it
    assert err.startswith("event: error\ndata: ")
    assert json.loads(err.split("data: ", 1)[1]) == {"type": "error", "error": {"code": 503, "message": "gone",
                                                                                 "type": "unavailable_error"}}
