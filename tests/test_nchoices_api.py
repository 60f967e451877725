"""n > 1, /v1/completions logprobs (OpenAI's legacy shape) and echo, over HTTP on the synthetic
model (-np 4): choices 0..n-1 streamed and not, usage summed, the prompt's logprobs, the openai SDK."""
from __future__ import annotations

import time

import httpx
import pytest
from serverproc import sse_events, start_server
from synth import write_model

GREEDY = {"temperature": 0, "ignore_eos": True}
SEEDED = {"temperature": 1.5, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": 99, "ignore_eos": True}
MSGS = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("nchoices_api") / "synth.gguf"
    write_model(path, n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=256, seed=3)
    srv, url = start_server(["-m", str(path), "-c", "8192", "-np", "4", "--slots"])
    yield url
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


def stream(http, path: str, body: dict) -> list[dict]:
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        evs = list(sse_events(r.iter_lines()))
    assert evs[-1] == "[DONE]"
    return [e for e in evs[:-1]]


def test_completions_n3(http):
    body = {"prompt": "Once", "max_tokens": 8, **GREEDY}
    one = http.post("/v1/completions", json=body).json()
    r = http.post("/v1/completions", json={**body, "n": 3}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    assert {c["text"] for c in r["choices"]} == {one["choices"][0]["text"]}
    assert r["usage"]["completion_tokens"] == 3 * one["usage"]["completion_tokens"] == 24
    assert r["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]
    chunks = stream(http, "/v1/completions", {**body, "n": 3})
    text: dict[int, str] = {}
    for c in chunks:
        for ch in c["choices"]:
            text[ch["index"]] = text.get(ch["index"], "") + ch["text"]
    assert text == {i: one["choices"][0]["text"] for i in range(3)}


def test_seeded_choices_differ_and_repeat(http):
    body = {"prompt": "Once", "max_tokens": 10, "n": 3, **SEEDED}
    a = [c["text"] for c in http.post("/v1/completions", json=body).json()["choices"]]
    b = [c["text"] for c in http.post("/v1/completions", json=body).json()["choices"]]
    assert a == b and len(set(a)) > 1


def test_chat_n3(http):
    body = {"messages": MSGS, "max_tokens": 6, **GREEDY}
    one = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    r = http.post("/v1/chat/completions", json={**body, "n": 3}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    assert all(c["message"]["content"] == one for c in r["choices"])
    assert r["usage"]["completion_tokens"] == 18
    chunks = stream(http, "/v1/chat/completions", {**body, "n": 3, "stream_options": {"include_usage": True}})
    text: dict[int, str] = {}
    finished = set()
    for c in chunks:
        for ch in c["choices"]:
            text[ch["index"]] = text.get(ch["index"], "") + (ch["delta"].get("content") or "")
            if ch["finish_reason"]:
                finished.add(ch["index"])
    assert text == {i: one for i in range(3)} and finished == {0, 1, 2}
    usage = [c["usage"] for c in chunks if c.get("usage")]
    assert len(usage) == 1 and usage[0]["completion_tokens"] == 18


def test_n_too_large_or_small(http):
    for n, needle in ((5, "slots"), (0, "'n'")):
        r = http.post("/v1/chat/completions", json={"messages": MSGS, "n": n})
        assert r.status_code == 400 and needle in r.json()["error"]["message"]
    r = http.post("/completion", json={"prompt": "x", "n_cmpl": 9})
    assert r.status_code == 400 and "-np" in r.json()["error"]["message"]
    r = http.post("/v1/completions", json={"prompt": "x", "logprobs": 21})
    assert r.status_code == 400 and "logprobs" in r.json()["error"]["message"]
    r = http.post("/v1/completions", json={"prompt": "x", "echo": "yes"})
    assert r.status_code == 400 and "echo" in r.json()["error"]["message"]


def check_legacy(lp: dict, text: str | None, top: int) -> None:
    n = len(lp["tokens"])
    assert n and all(len(lp[k]) == n for k in ("token_logprobs", "top_logprobs", "text_offset"))
    if text is not None:
        assert "".join(lp["tokens"]) == text
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(n)]
    for lpv, tops in zip(lp["token_logprobs"], lp["top_logprobs"]):
        if lpv is None:
            assert tops is None
            continue
        assert lpv <= 0 and 1 <= len(tops) <= top and all(v <= 0 for v in tops.values())


def test_legacy_logprobs(http):
    body = {"prompt": "Once", "max_tokens": 6, "logprobs": 2, **GREEDY}
    c = http.post("/v1/completions", json=body).json()["choices"][0]
    lp = c["logprobs"]
    check_legacy(lp, c["text"], 2)
    assert len(lp["tokens"]) == 6 and None not in lp["token_logprobs"]
    # greedy: the token taken is the most probable one
    assert all(max(t.values()) == v for t, v in zip(lp["top_logprobs"], lp["token_logprobs"]))
    assert len(lp["content"]) == 6     # llama-server's shape stays beside the legacy one
    # streamed: the same tokens, offsets running on over the chunks
    chunks = stream(http, "/v1/completions", body)
    got = {"tokens": [], "text_offset": []}
    for ch in chunks:
        x = ch["choices"][0]["logprobs"]
        if x:
            got["tokens"] += x["tokens"]
            got["text_offset"] += x["text_offset"]
    assert got == {"tokens": lp["tokens"], "text_offset": lp["text_offset"]}


def test_echo(http):
    body = {"prompt": "Once upon", "max_tokens": 4, **GREEDY}
    plain = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    c = http.post("/v1/completions", json={**body, "echo": True}).json()["choices"][0]
    assert c["text"] == "Once upon" + plain and c["logprobs"] is None


def test_echo_with_logprobs_scores_the_prompt(http):
    # the first token generated after "Once" ...
    first = http.post("/v1/completions", json={"prompt": "Once", "max_tokens": 1, "logprobs": 3,
                                                **GREEDY}).json()["choices"][0]
    t1, l1 = first["logprobs"]["content"][0]["id"], first["logprobs"]["token_logprobs"][0]
    # ... has that logprob as the last token of an echoed prompt "Once" + t1 (as token ids: the
    # synthetic model's tokens are bytes, not always text)
    ids = http.post("/tokenize", json={"content": "Once"}).json()["tokens"] + [t1]
    body = {"prompt": ids, "max_tokens": 2, "logprobs": 3, "echo": True, **GREEDY}
    c = http.post("/v1/completions", json=body).json()["choices"][0]
    lp = c["logprobs"]
    check_legacy(lp, None, 3)
    assert c["text"].startswith("Once")
    assert len(lp["tokens"]) == len(ids) + 2
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][len(ids) - 1] == pytest.approx(l1, abs=1e-4)
    assert lp["top_logprobs"][len(ids) - 1].keys() == first["logprobs"]["top_logprobs"][0].keys()
    # streamed: the prompt comes first, once per choice, then the tokens
    chunks = stream(http, "/v1/completions", {**body, "n": 2})
    text: dict[int, str] = {}
    toks: dict[int, list] = {}
    for ch in chunks:
        for x in ch["choices"]:
            text[x["index"]] = text.get(x["index"], "") + x["text"]
            if x["logprobs"]:
                toks.setdefault(x["index"], []).extend(x["logprobs"]["tokens"])
    assert text == {0: c["text"], 1: c["text"]} and toks == {0: lp["tokens"], 1: lp["tokens"]}


def test_openai_sdk_parses_legacy_logprobs_and_echo(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server + "/v1", api_key="sk-none", timeout=60)
    r = client.completions.create(model="synth", prompt="Once upon", max_tokens=3, temperature=0, logprobs=2,
                                  echo=True, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith("Once upon") and lp.token_logprobs[0] is None
    assert len(lp.tokens) == len(lp.text_offset) == len(lp.top_logprobs) and lp.tokens[-1]
    assert r.usage.completion_tokens == 6


def test_disconnect_ends_every_choice(http):
    body = {"prompt": "Hello", "max_tokens": 1900, "n": 3, "stream": True, **GREEDY}
    with http.stream("POST", "/v1/completions", json=body) as s:
        lines = s.iter_lines()      # keep the iterator: dropping it closes the stream
        next(lines)
        assert sum(x["is_processing"] for x in http.get("/slots").json()) == 3
    deadline = time.time() + 5
    while any(x["is_processing"] for x in http.get("/slots").json()) and time.time() < deadline:
        time.sleep(0.02)
    assert not any(x["is_processing"] for x in http.get("/slots").json())


def test_two_prompts_two_choices_each(http):
    body = {"max_tokens": 5, **GREEDY}
    a, b = (http.post("/v1/completions", json={**body, "prompt": p}).json()["choices"][0]["text"] for p in ("Ab", "Cd"))
    r = http.post("/v1/completions", json={**body, "prompt": ["Ab", "Cd"], "n": 2}).json()
    assert [(c["index"], c["text"]) for c in r["choices"]] == [(0, a), (1, a), (2, b), (3, b)]
    assert r["usage"]["prompt_tokens"] == sum(len(http.post("/tokenize", json={"content": p}).json()["tokens"])
                                              for p in ("Ab", "Cd"))


def test_echo_logprobs_scoring_only(http):
    # lm-eval-harness style: max_tokens 0, the prompt's logprobs only
    r = http.post("/v1/completions", json={"prompt": "Once upon", "max_tokens": 0, "logprobs": 1, "echo": True,
                                           **GREEDY}).json()
    c = r["choices"][0]
    assert c["text"] == "Once upon" and r["usage"]["completion_tokens"] == 0
    lp = c["logprobs"]
    check_legacy(lp, "Once upon", 1)
    assert len(lp["tokens"]) == r["usage"]["prompt_tokens"] and lp["token_logprobs"][0] is None


def test_native_completion_n_cmpl(http):
    body = {"prompt": "Once", "n_predict": 5, **GREEDY}
    one = http.post("/completion", json=body).json()["content"]
    r = http.post("/completion", json={**body, "n_cmpl": 2}).json()
    assert isinstance(r, list) and [(x["index"], x["content"]) for x in r] == [(0, one), (1, one)]
    assert r[0]["id_slot"] != r[1]["id_slot"]
