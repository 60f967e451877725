"""n > 1 and legacy logprobs/echo on the real model (SmolLM2-135M-Instruct, -np 3): three choices
streamed and not, indices 0..2; greedy ones equal the n=1 reply, seeded ones differ; the openai
SDK parses `completions.create(logprobs=2, echo=True)`."""
from __future__ import annotations

import httpx
import pytest
from serverproc import sse_events, start_server

pytestmark = pytest.mark.slow

PROMPT = "The three primary colors are"
MSGS = [{"role": "user", "content": "Name a fruit."}]


@pytest.fixture(scope="module")
def server(model_path):
    srv, url = start_server(["-m", str(model_path), "-c", "1024", "-np", "3", "-t", "2"])
    yield url
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, timeout=120) as c:
        yield c


def streamed_texts(http, path: str, body: dict, key) -> dict[int, str]:
    out: dict[int, str] = {}
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for ev in sse_events(r.iter_lines()):
            if ev == "[DONE]":
                break
            for c in ev["choices"]:
                out[c["index"]] = out.get(c["index"], "") + (key(c) or "")
    return out


def test_three_greedy_choices_equal_the_single_reply(http):
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    one = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    r = http.post("/v1/completions", json={**body, "n": 3}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    assert [c["text"] for c in r["choices"]] == [one] * 3
    assert streamed_texts(http, "/v1/completions", {**body, "n": 3}, lambda c: c["text"]) == {0: one, 1: one, 2: one}


def test_three_seeded_chat_choices_differ(http):
    body = {"messages": MSGS, "max_tokens": 10, "temperature": 1.0, "seed": 7, "n": 3}
    r = http.post("/v1/chat/completions", json=body).json()
    texts = [c["message"]["content"] for c in r["choices"]]
    assert [c["index"] for c in r["choices"]] == [0, 1, 2] and len(set(texts)) > 1
    assert 10 < r["usage"]["completion_tokens"] <= 30      # summed over the choices, 10 at most each
    got = streamed_texts(http, "/v1/chat/completions", body, lambda c: c["delta"].get("content"))
    assert got == dict(enumerate(texts))       # the same seeds: the same three replies


def test_openai_sdk_legacy_logprobs_echo(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server + "/v1", api_key="sk-none", timeout=120)
    r = client.completions.create(model="smollm", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2, echo=True)
    c = r.choices[0]
    lp = c.logprobs
    assert c.text.startswith(PROMPT) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens) == c.text
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    assert all(v <= 0 and len(t) <= 2 for v, t in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]))
    plain = client.completions.create(model="smollm", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2)
    assert c.text == PROMPT + plain.choices[0].text
    assert lp.token_logprobs[-4:] == pytest.approx(plain.choices[0].logprobs.token_logprobs, abs=1e-4)
