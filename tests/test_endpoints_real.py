"""/v1/responses and /v1/messages on the real model (SmolLM2-135M-Instruct) with the official SDKs
as the clients: `openai` (client.responses.create / .stream) and `anthropic` (client.messages.create
/ .stream / .count_tokens), streamed and not, structured output, forced tool calls, the error
shapes and the API key each SDK sends (Bearer / x-api-key). One server for the module."""
from __future__ import annotations

import json

import pytest
from serverproc import start_server

pytestmark = pytest.mark.slow

KEY = "sk-real-endpoints"
ASK = "What is the capital of France?"
GREEDY = {"temperature": 0}         # the anthropic SDK may lack `temperature`: sent as extra_body
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


@pytest.fixture(scope="module")
def server(model_path):
    srv, url = start_server(["-m", str(model_path), "-c", "4096", "-np", "2", "-t", "2", "--api-key", KEY])
    yield url
    srv.stop()


@pytest.fixture(scope="module")
def oai(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, timeout=120)


@pytest.fixture(scope="module")
def claude(server):
    anthropic = pytest.importorskip("anthropic")
    return anthropic.Anthropic(base_url=server, api_key=KEY, timeout=120, max_retries=0)


# -- OpenAI Responses -------------------------------------------------------------------------------
def test_responses_create_and_stream(oai):
    kw = dict(model="smollm", input=ASK, instructions="Answer in one sentence.", max_output_tokens=32, **GREEDY)
    r = oai.responses.create(**kw)
    assert r.status == "completed" and r.object == "response"
    assert "Paris" in r.output_text and r.output[0].type == "message"
    assert r.usage.output_tokens > 0 and r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    events = list(oai.responses.create(stream=True, **kw))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    with oai.responses.stream(**kw) as s:
        deltas = [e.delta for e in s if e.type == "response.output_text.delta"]
        final = s.get_final_response()
    assert "".join(deltas) == final.output_text == r.output_text


def test_responses_cut_by_length(oai):
    r = oai.responses.create(model="smollm", input=ASK, max_output_tokens=3, **GREEDY)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3


def test_responses_structured_output(oai):
    pydantic = pytest.importorskip("pydantic")

    class Capital(pydantic.BaseModel):
        capital: str

    # the SDK sends the model's JSON schema as text.format (strict) and parses output_text back into it
    r = oai.responses.parse(model="smollm", input=ASK + " Reply in JSON.", max_output_tokens=48, text_format=Capital,
                            **GREEDY)
    assert isinstance(r.output_parsed, Capital) and r.output_parsed.capital
    assert json.loads(r.output_text) == r.output_parsed.model_dump()


def test_responses_function_call(oai):
    tools = [{"type": "function", "name": "get_weather", "description": "The weather in a city",
              "parameters": WEATHER}]
    r = oai.responses.create(model="smollm", input="What is the weather in Paris?", tools=tools,
                             tool_choice="required", max_output_tokens=64, **GREEDY)
    [call] = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and "city" in json.loads(call.arguments)
    # the call and its output sent back as input items render into the next turn
    r2 = oai.responses.create(model="smollm", tools=tools, tool_choice="none", max_output_tokens=24, **GREEDY,
                              input=[{"role": "user", "content": "What is the weather in Paris?"},
                                     {"type": "function_call", "call_id": call.call_id, "name": call.name,
                                      "arguments": call.arguments},
                                     {"type": "function_call_output", "call_id": call.call_id,
                                      "output": "sunny, 21 C"}])
    assert r2.output_text and r2.usage.input_tokens > r.usage.input_tokens


def test_responses_bad_request(oai):
    import openai
    with pytest.raises(openai.BadRequestError) as e:
        oai.responses.create(model="smollm", input="x", previous_response_id="resp_nope")
    assert e.value.status_code == 400 and "previous_response_id" in e.value.body["message"]


# -- Anthropic Messages -----------------------------------------------------------------------------
def test_messages_create_stream_and_count(claude):
    kw = dict(model="smollm", max_tokens=32, system="Answer in one sentence.",
              messages=[{"role": "user", "content": ASK}], extra_body=GREEDY)
    m = claude.messages.create(**kw)
    assert m.type == "message" and m.role == "assistant" and m.stop_reason == "end_turn"
    assert m.content[0].type == "text" and "Paris" in m.content[0].text
    assert m.usage.output_tokens > 0
    with claude.messages.stream(**kw) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == m.content[0].text == final.content[0].text
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == m.usage.output_tokens
    n = claude.messages.count_tokens(model="smollm", system=kw["system"], messages=kw["messages"])
    for u in (m.usage, final.usage):       # input_tokens: those not read from the cache, as llama-server counts
        assert u.input_tokens + u.cache_read_input_tokens == n.input_tokens


def test_messages_stop_sequence_and_max_tokens(claude):
    msgs = [{"role": "user", "content": ASK}]
    m = claude.messages.create(model="smollm", max_tokens=32, stop_sequences=["Paris"], messages=msgs,
                               extra_body=GREEDY)
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == "Paris" and "Paris" not in m.content[0].text
    m = claude.messages.create(model="smollm", max_tokens=2, messages=msgs, extra_body=GREEDY)
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 2


def test_messages_bad_request_and_key(claude, server):
    anthropic = pytest.importorskip("anthropic")
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model="smollm", max_tokens=0, messages=[{"role": "user", "content": "x"}])
    body = e.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model="smollm", max_tokens=8, messages=[{"role": "system", "content": "x"}])
    wrong = anthropic.Anthropic(base_url=server, api_key="sk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as e:
        wrong.messages.count_tokens(model="smollm", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["error"]["type"] == "authentication_error"


def test_messages_forced_tool_use(claude):
    tools = [{"name": "get_weather", "description": "The weather in a city", "input_schema": WEATHER}]
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw = dict(model="smollm", max_tokens=64, tools=tools, messages=msgs, extra_body=GREEDY)
    m = claude.messages.create(tool_choice={"type": "tool", "name": "get_weather"}, **kw)
    assert m.stop_reason == "tool_use"
    [use] = [b for b in m.content if b.type == "tool_use"]
    assert use.name == "get_weather" and isinstance(use.input.get("city"), str)
    with claude.messages.stream(tool_choice={"type": "any"}, **kw) as s:
        final = s.get_final_message()
    [streamed] = [b for b in final.content if b.type == "tool_use"]
    assert final.stop_reason == "tool_use" and streamed.name == "get_weather" and streamed.input == use.input
    # the tool_use and its tool_result sent back; no tool may be called now: a text answer
    follow = [*msgs, {"role": "assistant", "content": [use.model_dump(exclude_none=True)]},
              {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 21 C"}]}]
    m2 = claude.messages.create(**{**kw, "messages": follow, "max_tokens": 24}, tool_choice={"type": "none"})
    assert [b.type for b in m2.content] == ["text"] and m2.content[0].text
