"""The server on the real model (SmolLM2-135M-Instruct): the official `openai` client, 8 concurrent
greedy requests on -np 8 equal to each alone, seeded sampling. (A long prompt arriving while
streams decode: tests/test_server_prefill.py, on the synthetic model.)"""
from __future__ import annotations

import concurrent.futures as cf

import httpx
import pytest
from serverproc import start_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(model_path):
    srv, url = start_server(["-m", str(model_path), "-c", "4096", "-np", "8", "-t", "2"])
    yield url
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server + "/v1", api_key="sk-none", timeout=120)


def test_openai_models(client, model_path):
    models = client.models.list()
    assert [m.id for m in models.data] == [str(model_path)]


def test_openai_chat(client):
    r = client.chat.completions.create(model="smollm", temperature=0, max_tokens=24, messages=[
        {"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens > 0


def test_openai_chat_streamed(client):
    kw = dict(model="smollm", temperature=0, max_tokens=24,
              messages=[{"role": "user", "content": "What is the capital of France?"}])
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole and chunks[-1].choices[0].finish_reason == "stop"


def test_openai_completions(client):
    r = client.completions.create(model="smollm", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.choices[0].text.startswith(" Paris") and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8


def test_openai_logprobs(client):
    r = client.chat.completions.create(model="smollm", temperature=0, max_tokens=3, logprobs=True, top_logprobs=2,
                                       messages=[{"role": "user", "content": "Hi"}])
    lp = r.choices[0].logprobs.content
    assert len(lp) == 3 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in lp)
    assert lp[0].token == lp[0].top_logprobs[0].token


def test_eight_concurrent_greedy_requests_equal_each_alone(server):
    # short prompts, 8 tokens: the point is 8 rows in each decode step, not a long prefill
    prompts = [f"Write a sentence about the number {i}." for i in range(8)]

    def ask(p: str) -> str:
        r = httpx.post(server + "/completion", timeout=120, json={
            "prompt": p, "temperature": 0, "n_predict": 8, "cache_prompt": False})
        return r.json()["content"]

    alone = [ask(p) for p in prompts]
    with cf.ThreadPoolExecutor(8) as ex:
        together = list(ex.map(ask, prompts))
    assert together == alone
    assert len(set(alone)) > 1


def test_seeded_sampling_repeats_and_temperature_zero_is_greedy(server):
    body = {"prompt": "Once upon a time", "n_predict": 24, "temperature": 1.0, "seed": 42}
    a = httpx.post(server + "/completion", json=body, timeout=120).json()["content"]
    b = httpx.post(server + "/completion", json=body, timeout=120).json()["content"]
    assert a == b
    t0 = httpx.post(server + "/completion", timeout=120, json={"prompt": "Once upon a time", "n_predict": 24,
                                                               "temperature": 0}).json()["content"]
    k1 = httpx.post(server + "/completion", timeout=120, json={"prompt": "Once upon a time", "n_predict": 24,
                                                               "top_k": 1, "seed": 7}).json()["content"]
    assert t0 == k1
