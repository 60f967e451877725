"""Issue 12, item 6: the request bodies are pydantic models (frontend/api/schemas.py). /openapi.json
describes them; numbers may come as strings, null is absent, unknown fields are ignored, a body sent
with curl's default form type is read as JSON; wrong types are 400s in llama.cpp's shape naming
the field."""
from __future__ import annotations

import httpx
import pytest
from serverproc import start_server
from synth import write_model


@pytest.fixture(scope="module")
def http(tmp_path_factory):
    path = tmp_path_factory.mktemp("schemas") / "synth.gguf"
    write_model(path, n_layer=1, n_embd=64, n_head=2, n_head_kv=1, n_ff=128, seed=7)
    srv, url = start_server(["-m", str(path), "-c", "256", "-np", "1", "-a", "synth"])
    with httpx.Client(base_url=url, timeout=60) as c:
        yield c
    srv.stop()


def _error(r: httpx.Response) -> str:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == 400 and err["type"] == "invalid_request_error"
    return err["message"]


def test_openapi_describes_the_request_bodies(http):
    spec = http.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]

    def body_schema(path: str) -> dict:
        ref = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        return schemas[ref.rsplit("/", 1)[1]]

    chat = body_schema("/v1/chat/completions")
    assert "messages" in chat["required"] and {"temperature", "tools", "response_format", "n_predict"} <= set(
        chat["properties"])
    comp = body_schema("/completion")
    assert {"prompt", "top_k", "grammar", "json_schema", "seed", "logit_bias"} <= set(comp["properties"])
    assert body_schema("/v1/completions") == comp
    assert "content" in body_schema("/tokenize")["required"]
    assert {"input", "encoding_format"} <= set(body_schema("/v1/embeddings")["properties"])
    assert {"query", "documents", "top_n"} <= set(body_schema("/v1/rerank")["properties"])
    assert {"input_prefix", "input_suffix", "input_extra"} <= set(body_schema("/infill")["properties"])
    assert http.get("/docs").status_code == 200


def test_numbers_as_strings_null_as_absent_extra_ignored(http):
    r = http.post("/completion", json={"prompt": "x", "n_predict": "3", "temperature": "0", "top_k": None,
                                       "ignore_eos": True, "frobnicate": {"a": 1}})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["tokens_predicted"] == 3
    gs = out["generation_settings"]
    assert gs["temperature"] == 0.0 and gs["top_k"] == 40     # top_k null: the server's default


def test_body_with_a_form_content_type_is_json(http):
    # curl -d '{...}' sends application/x-www-form-urlencoded; llama-server reads the JSON anyway
    r = http.post("/completion", content=b'{"prompt": "x", "n_predict": 2, "ignore_eos": true}',
                  headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text
    assert r.json()["tokens_predicted"] == 2


@pytest.mark.parametrize("path,body,needle", [
    ("/completion", {"prompt": "x", "n_predict": 1.5}, "'n_predict'"),
    ("/completion", {"prompt": "x", "top_k": True}, "'top_k'"),
    ("/completion", {"prompt": "x", "stream": "yes"}, "'stream'"),
    ("/completion", {"prompt": "x", "top_k": -3}, "'top_k'"),
    ("/completion", {"prompt": "x", "stop": [1, 2]}, "'stop"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, "'messages.0.role'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 21}, "'top_logprobs'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "sometimes"},
     "'tool_choice'"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "hex"}, "'encoding_format'"),
])
def test_wrong_types_are_400_naming_the_field(http, path, body, needle):
    assert needle in _error(http.post(path, json=body))


def test_nan_and_non_object_bodies(http):
    assert "'temperature'" in _error(http.post("/completion", content=b'{"prompt": "x", "temperature": NaN}',
                                               headers={"content-type": "application/json"}))
    assert "JSON object" in _error(http.post("/completion", json=[1, 2]))
    assert "Invalid JSON" in _error(http.post("/completion", content=b"{nope",
                                              headers={"content-type": "application/json"}))
