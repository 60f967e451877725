"""Structured output and tool calls on the real model (SmolLM2-135M-Instruct, greedy; it is tiny
and poor at tools, so the calls are constrained): a JSON-schema reply that validates, a GBNF
choice, json_object, a forced tool call streamed and not, a tool-result round trip."""
from __future__ import annotations

import json

import jsonschema
import pytest
from serverproc import start_server

pytestmark = pytest.mark.slow

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "languages": {"type": "array", "items": {"enum": ["English", "French", "German"]}, "minItems": 1, "maxItems": 2},
    "role": {"enum": ["engineer", "teacher", "doctor"]}},
    "required": ["name", "age", "languages", "role"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                           "unit": {"enum": ["celsius", "fahrenheit"]}},
                          "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Current time in a timezone",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(model_path):
    openai = pytest.importorskip("openai")
    srv, url = start_server(["-m", str(model_path), "-c", "4096", "-np", "2", "-t", "2"])
    yield openai.OpenAI(base_url=url + "/v1", api_key="sk-none", timeout=120), url
    srv.stop()


def test_json_schema_reply(client):
    c, _ = client
    r = c.chat.completions.create(model="m", temperature=0, max_tokens=64, messages=[
        {"role": "user", "content": "Describe a made-up person."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    assert r.choices[0].finish_reason == "stop"


def test_gbnf_and_json_object(client):
    import httpx
    _, url = client
    r = httpx.post(url + "/completion", timeout=120, json={
        "prompt": "Is the sky blue? Answer yes or no:", "grammar": 'root ::= "yes" | "no"', "temperature": 0}).json()
    assert r["content"] in ("yes", "no")
    c, _ = client
    r = c.chat.completions.create(model="m", temperature=0, max_tokens=40, response_format={"type": "json_object"},
                                  messages=[{"role": "user", "content": "Give me a JSON object about a cat."}])
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith("{")


def test_forced_tool_call(client):
    c, _ = client
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = c.chat.completions.create(model="m", temperature=0, max_tokens=48, messages=ASK, tools=[WEATHER, TIME],
                                      tool_choice=choice)
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls" and ch.message.content is None
        call = ch.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        if choice != "required":
            assert call.function.name == "get_weather"
        fn = WEATHER if call.function.name == "get_weather" else TIME
        jsonschema.validate(json.loads(call.function.arguments), fn["function"]["parameters"])


def test_forced_tool_call_streamed(client):
    c, _ = client
    kw = dict(model="m", temperature=0, max_tokens=48, messages=ASK, tools=[WEATHER],
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = c.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    chunks = list(c.chat.completions.create(stream=True, **kw))
    calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert calls[0].id.startswith("call_") and calls[0].function.name == "get_weather"
    args = "".join(tc.function.arguments or "" for tc in calls)
    assert args == whole.function.arguments
    jsonschema.validate(json.loads(args), WEATHER["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_result_round_trip(client):
    c, _ = client
    msgs = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temperature": 21, "sky": "sunny"})}]
    r = c.chat.completions.create(model="m", temperature=0, max_tokens=40, messages=msgs, tools=[WEATHER],
                                  tool_choice="none")
    ch = r.choices[0]
    # the history went through the template (the generic JSON for SmolLM2's template, which has no
    # tool support) and the reply is a message, no call; the tiny model tends to echo that JSON
    assert ch.finish_reason in ("stop", "length") and not ch.message.tool_calls and ch.message.content
    assert r.usage.prompt_tokens > 60
