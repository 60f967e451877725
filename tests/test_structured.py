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
    out: dict[str, str] = {}
    go = threading.Barrier(2)

    def run(name: str, extra: dict) -> None:
        go.wait()
        r = httpx.post(url + "/completion", timeout=60, json={
            "prompt": f"{name}:", "n_predict": 40, "ignore_eos": True, "temperature": 0, "cache_prompt": False, **extra})
        out[name] = r.json()["content"]

    ts = [threading.Thread(target=run, args=("free", {})),
          threading.Thread(target=run, args=("lower", {"grammar": "root ::= [a-z]+"}))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert re.fullmatch("[a-z]{40,}", out["lower"]) and not re.fullmatch("[a-z]*", out["free"])
    assert sum(len(s) == 2 for s in seqs) >= 20       # most decode steps carried both requests
