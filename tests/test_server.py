"""The HTTP server over plain HTTP, on a tiny synthetic model: one test per endpoint and per class
of bad input. Servers are real (uvicorn on a loopback port)."""
from __future__ import annotations

import json
import re
import ssl
import threading
import time

import httpx
import pytest
from serverproc import AppThread, cli_server, make_cert, sse_events, start_server
from synth import write_model

GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    path = tmp_path_factory.mktemp("server") / "synth.gguf"
    write_model(path, n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=256, seed=3)
    return path


@pytest.fixture(scope="module")
def server(synth):
    srv, url = start_server(["-m", str(synth), "-c", "1024", "-np", "4", "--metrics", "--slots", "-a", "synth"])
    yield url
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


def greedy_text(http, prompt="Hello", n=24) -> str:
    r = http.post("/completion", json={"prompt": prompt, "n_predict": n, **GREEDY})
    assert r.status_code == 200, r.text
    return r.json()["content"]


def assert_error(r: httpx.Response, code: int, kind: str | None = None) -> str:
    assert r.status_code == code, r.text
    err = r.json()["error"]
    assert err["code"] == code and isinstance(err["message"], str) and err["message"]
    if kind:
        assert err["type"] == kind
    return err["message"]


# -- read-only endpoints ------------------------------------------------------------------------
def test_health(http):
    r = http.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert [n["state"] for n in r.json()["nodes"]] == ["attached"]


def test_health_and_everything_else_503_while_loading():
    from llamarpc.frontend.api import ServerSettings, ServerState, create_app

    app = AppThread(create_app(ServerState(ServerSettings(model_path="x.gguf"))))
    try:
        r = httpx.get(app.url + "/health")
        assert r.status_code == 503
        assert r.json() == {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
        assert_error(httpx.post(app.url + "/completion", json={"prompt": "x"}), 503, "unavailable_error")
    finally:
        app.stop()


def test_props(http):
    p = http.get("/props").json()
    assert p["total_slots"] == 4 and p["model_path"].endswith("synth.gguf")
    assert p["default_generation_settings"]["n_ctx"] == 256
    assert p["default_generation_settings"]["params"]["top_k"] == 40
    assert "<|im_start|>" in p["chat_template"]        # the synthetic GGUF has none: ChatML


def test_models(http):
    m = http.get("/v1/models").json()
    assert m["object"] == "list" and m["data"][0]["id"] == "synth" and m["data"][0]["owned_by"] == "llamacpp"
    assert m["data"][0]["meta"]["n_vocab"] == 264


def test_slots(http):
    slots = http.get("/slots").json()
    assert [s["id"] for s in slots] == [0, 1, 2, 3] and all(s["n_ctx"] == 256 for s in slots)


def test_metrics(http):
    greedy_text(http, n=4)
    text = http.get("/metrics").text
    for name in ("prompt_tokens_total", "prompt_seconds_total", "tokens_predicted_total",
                 "tokens_predicted_seconds_total", "prompt_tokens_seconds", "predicted_tokens_seconds",
                 "kv_cache_usage_ratio", "kv_cache_tokens", "requests_processing", "requests_deferred"):
        assert re.search(rf"^llamacpp:{name} [0-9.e+-]+$", text, re.M), name
    assert float(re.search(r"^llamacpp:tokens_predicted_total (\S+)", text, re.M).group(1)) >= 4


# -- generation ---------------------------------------------------------------------------------
def test_completion_prompt_shapes(http):
    ids = http.post("/tokenize", json={"content": "Hello"}).json()["tokens"]
    by_text = http.post("/completion", json={"prompt": "Hello", "n_predict": 8, **GREEDY}).json()
    by_ids = http.post("/completion", json={"prompt": ids, "n_predict": 8, **GREEDY}).json()
    mixed = http.post("/completion", json={"prompt": [ids[0], "ello"], "n_predict": 8, **GREEDY}).json()
    assert by_text["content"] == by_ids["content"]
    assert by_text["tokens_predicted"] == 8 and by_text["stop_type"] == "limit" and by_text["stopped_limit"]
    assert mixed["tokens_evaluated"] == 1 + len(http.post("/tokenize", json={"content": "ello"}).json()["tokens"])
    for key in ("content", "stop", "tokens_evaluated", "tokens_cached", "truncated", "timings",
                "generation_settings", "model", "stopping_word", "stopped_eos", "stopped_word"):
        assert key in by_text
    many = http.post("/completion", json={"prompt": ["Hello", ids], "n_predict": 8, **GREEDY}).json()
    assert [m["content"] for m in many] == [by_text["content"]] * 2 and [m["index"] for m in many] == [0, 1]


def test_completion_stream_is_the_non_streamed_reply(http):
    body = {"prompt": "Once upon", "n_predict": 12, **GREEDY}
    whole = http.post("/completion", json=body).json()
    with http.stream("POST", "/completion", json={**body, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r.iter_lines()))
    assert all(e["stop"] is False for e in events[:-1]) and events[-1]["stop"] is True
    assert "".join(e["content"] for e in events) == whole["content"]
    assert [t for e in events[:-1] for t in e["tokens"]] and events[-1]["timings"]["predicted_n"] == 12


def test_stop_strings_never_sent(http):
    text = greedy_text(http, "Once upon", 30)
    m = re.search(r"[A-Za-z0-9]{2}", text[3:])
    if m is None:
        pytest.skip("no ASCII pair in the synthetic model's output")
    stop = m.group(0)
    want = text[:text.find(stop)]
    body = {"prompt": "Once upon", "n_predict": 30, "stop": [stop], **GREEDY}
    r = http.post("/completion", json=body).json()
    assert r["content"] == want and r["stop_type"] == "word" and r["stopping_word"] == stop and r["stopped_word"]
    with http.stream("POST", "/completion", json={**body, "stream": True}) as s:
        sent = "".join(e["content"] for e in sse_events(s.iter_lines()))
    assert sent == want


def test_seed_reproduces_and_temperature_zero_is_greedy(http):
    body = {"prompt": "Hello", "n_predict": 16, "temperature": 1.0, "seed": 1234, "ignore_eos": True}
    a = http.post("/completion", json=body).json()
    b = http.post("/completion", json=body).json()
    c = http.post("/completion", json={**body, "seed": 99}).json()
    assert a["content"] == b["content"] and a["content"] != c["content"]
    assert a["generation_settings"]["seed"] == 1234
    t0 = http.post("/completion", json={"prompt": "Hello", "n_predict": 16, "temperature": 0, "ignore_eos": True})
    k1 = http.post("/completion", json={"prompt": "Hello", "n_predict": 16, "top_k": 1, "temperature": 1.5,
                                        "ignore_eos": True, "seed": 5})
    assert t0.json()["content"] == k1.json()["content"]


def test_logit_bias_ban_and_n_probs(http):
    base = http.post("/completion", json={"prompt": "Hello", "n_predict": 1, "n_probs": 3, **GREEDY}).json()
    probs = base["completion_probabilities"]
    assert len(probs) == 1 and len(probs[0]["top_logprobs"]) == 3
    first = probs[0]["id"]
    assert probs[0]["top_logprobs"][0]["id"] == first and probs[0]["logprob"] <= 0
    banned = http.post("/completion", json={"prompt": "Hello", "n_predict": 1, "n_probs": 1,
                                            "logit_bias": [[first, False]], **GREEDY}).json()
    assert banned["completion_probabilities"][0]["id"] != first
    as_object = http.post("/completion", json={"prompt": "Hello", "n_predict": 1, "n_probs": 1,
                                               "logit_bias": {str(first): False}, **GREEDY}).json()
    assert as_object["completion_probabilities"][0]["id"] == banned["completion_probabilities"][0]["id"]
    post = http.post("/completion", json={"prompt": "Hello", "n_predict": 1, "n_probs": 2, "post_sampling_probs": True,
                                          **GREEDY}).json()
    assert post["completion_probabilities"][0]["prob"] == pytest.approx(1.0)


def test_sampler_options_are_accepted(http):
    r = http.post("/completion", json={
        "prompt": "Hello", "n_predict": 6, "seed": 3, "samplers": ["penalties", "dry", "top_k", "xtc", "temperature"],
        "repeat_penalty": 1.3, "repeat_last_n": 16, "presence_penalty": 0.5, "frequency_penalty": 0.2,
        "dry_multiplier": 0.8, "dry_sequence_breakers": ["\n"], "xtc_probability": 0.5, "xtc_threshold": 0.1,
        "typical_p": 0.9, "dynatemp_range": 0.3, "min_keep": 2, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["generation_settings"]["samplers"] == [
        "penalties", "dry", "top_k", "xtc", "temperature"]
    for mirostat in (1, 2):
        r = http.post("/completion", json={"prompt": "Hello", "n_predict": 6, "mirostat": mirostat, "seed": 1})
        assert r.status_code == 200


def test_v1_completions(http):
    r = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 8, **GREEDY}).json()
    assert r["object"] == "text_completion" and r["choices"][0]["finish_reason"] == "length"
    assert r["usage"]["completion_tokens"] == 8 and r["choices"][0]["text"] == greedy_text(http, n=8)
    with http.stream("POST", "/v1/completions", json={"prompt": "Hello", "max_tokens": 8, "stream": True,
                                                      **GREEDY}) as s:
        events = list(sse_events(s.iter_lines()))
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == r["choices"][0]["text"]


def test_v1_chat_completions(http):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = http.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 8, **GREEDY}).json()
    assert r["object"] == "chat.completion" and r["choices"][0]["message"]["role"] == "assistant"
    prompt = http.post("/apply-template", json={"messages": msgs}).json()["prompt"]
    assert r["usage"]["prompt_tokens"] == len(http.post("/tokenize", json={"content": prompt}).json()["tokens"])
    with http.stream("POST", "/v1/chat/completions", json={"messages": msgs, "max_tokens": 8, "stream": True,
                                                           "stream_options": {"include_usage": True}, **GREEDY}) as s:
        events = list(sse_events(s.iter_lines()))
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 8
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
    assert text == r["choices"][0]["message"]["content"]
    assert [e for e in events[:-1] if e["choices"]][-1]["choices"][0]["finish_reason"] == "length"


def test_tokenize_detokenize(http):
    r = http.post("/tokenize", json={"content": "hello é", "with_pieces": True}).json()["tokens"]
    assert "".join(t["piece"] for t in r if isinstance(t["piece"], str)) == "hello "
    assert any(isinstance(t["piece"], list) for t in r)     # 'é' is two byte tokens: not valid UTF-8 alone
    ids = [t["id"] for t in r]
    assert http.post("/detokenize", json={"tokens": ids}).json() == {"content": "hello é"}
    special = http.post("/tokenize", json={"content": "<|im_start|>"}).json()["tokens"]
    assert special == [1]
    plain = http.post("/tokenize", json={"content": "<|im_start|>", "parse_special": False}).json()["tokens"]
    assert len(plain) > 1


def test_apply_template(http):
    r = http.post("/apply-template", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert r["prompt"] == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_llm_api_predict_and_chat(http):
    text = greedy_text(http, "Hello", 20)
    r = http.post("/predict", data={"prompt": "Hello", "temperature": "0"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert r.text.startswith(text[:10])
    m = re.search(r"[A-Za-z0-9]", text[2:])
    if m:
        cut = text.find(m.group(0))
        r = http.post("/predict", data={"prompt": "Hello", "temperature": "0", "stopRegex": re.escape(m.group(0))})
        assert r.text == text[:cut]
    r = http.post("/chat", content="messages=Hi&messages=Hello!&messages=Who+are+you%3F&temperature=0",
                  headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200
    prompt = http.post("/apply-template", json={"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Who are you?"}]}).json()["prompt"]
    same = http.post("/completion", json={"prompt": prompt, "temperature": 0, "n_predict": 5}).json()["content"]
    assert r.text.startswith(same[:3])
    bad = http.post("/chat", data={"messages": ["Hi", "Hello!"]})
    assert bad.status_code == 400 and "end with a user message" in bad.text
    assert http.post("/predict", data={}).status_code == 400


def test_disconnect_frees_the_slot(synth):
    # a server of its own with room for a long generation, so that the request cannot finish
    # before the client goes away (the synthetic model makes >1,000 tokens/s)
    srv, url = start_server(["-m", str(synth), "-c", "8192", "-np", "1", "--metrics", "--slots"])
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            with c.stream("POST", "/completion", json={"prompt": "Hello", "n_predict": 8000, "stream": True,
                                                       **GREEDY}) as s:
                lines = s.iter_lines()   # keep the iterator: dropping it closes the stream
                next(lines)
                assert any(x["is_processing"] for x in c.get("/slots").json())
            deadline = time.time() + 5
            while any(x["is_processing"] for x in c.get("/slots").json()) and time.time() < deadline:
                time.sleep(0.02)
            assert not any(x["is_processing"] for x in c.get("/slots").json())
            predicted = [ln for ln in c.get("/metrics").text.splitlines()
                         if ln.startswith("llamacpp:tokens_predicted_total")]
            assert float(predicted[0].split()[-1]) < 8000   # cut short by the disconnect
    finally:
        srv.stop()


def test_concurrent_requests_queue_and_match(http, server):
    import concurrent.futures as cf

    prompts = [f"Prompt number {i}" for i in range(7)]     # 7 requests, 4 slots
    alone = [http.post("/completion", json={"prompt": p, "n_predict": 10, "cache_prompt": False,
                                            **GREEDY}).json()["content"] for p in prompts]
    with cf.ThreadPoolExecutor(7) as ex:
        together = list(ex.map(lambda p: httpx.post(server + "/completion", timeout=60, json={
            "prompt": p, "n_predict": 10, "cache_prompt": False, **GREEDY}).json()["content"], prompts))
    assert together == alone


# -- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("path,body,needle", [
    ("/completion", b"{not json", "Invalid JSON"),
    ("/completion", b"[1, 2]", "JSON object"),
    ("/completion", {"prompt": "x", "n_predict": "many"}, "n_predict"),
    ("/completion", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/completion", {"prompt": "x", "stream": 1}, "stream"),
    ("/completion", {"prompt": 3.5}, "prompt"),
    ("/completion", {"prompt": [1, 99999]}, "out of range"),
    ("/completion", {"prompt": ""}, "empty"),
    ("/completion", {"prompt": "x", "samplers": ["top_k", "nope"]}, "unknown sampler"),
    ("/completion", {"prompt": "x", "samplers": "kq"}, "unknown sampler"),
    ("/completion", {"prompt": "x" * 300}, "exceeds"),
    ("/completion", {"prompt": "x", "logit_bias": [[1, "lots"]]}, "logit_bias"),
    ("/completion", {"prompt": "x", "mirostat": 3}, "mirostat"),
    ("/completion", {"prompt": "x", "grammar": "root ::= foo"}, "'grammar'"),
    ("/completion", {"prompt": "x", "grammar": 'root ::= "a" ('}, "'grammar'"),
    ("/completion", {"prompt": "x", "json_schema": {"type": "nope"}}, "'json_schema'"),
    ("/completion", {"prompt": "x", "json_schema": {}, "grammar": "root ::= \"a\""}, "not both"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "xml"}},
     "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 3}}}},
     "response_format.json_schema.schema"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"model": "x"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "content"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "bogus", "content": "hi"}]}, "role"),
    ("/v1/completions", {"prompt": "x", "n": 5}, "slots"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("/tokenize", {"content": 5}, "content"),
    ("/detokenize", {"tokens": ["a"]}, "tokens"),
    ("/apply-template", {"messages": "hi"}, "messages"),
])
def test_bad_input_is_400(http, path, body, needle):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    msg = assert_error(http.post(path, **kw), 400, "invalid_request_error")
    assert needle.lower() in msg.lower()


def test_unknown_route_404(http):
    assert_error(http.get("/nope"), 404, "not_found_error")


@pytest.fixture(scope="module")
def secure(synth, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tls")
    pair = make_cert(tmp)
    if pair is None:
        pytest.skip("openssl is not available to make a test certificate")
    keyfile = tmp / "keys.txt"
    keyfile.write_text("# team keys\nkey-two\n")
    template = tmp / "template.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                        "{% if add_generation_prompt %}[assistant] {% endif %}")
    srv, url = start_server(["-m", str(synth), "-c", "256", "--api-key", "key-one", "--api-key-file", str(keyfile),
                             "--ssl-key-file", str(pair[0]), "--ssl-cert-file", str(pair[1]),
                             "--chat-template-file", str(template)])
    yield url, str(pair[1])
    srv.stop()


def test_api_keys_and_https(secure):
    url, ca = secure
    assert url.startswith("https://")
    with httpx.Client(base_url=url, verify=ssl.create_default_context(cafile=ca), timeout=30) as c:
        assert c.get("/health").status_code == 200                        # public
        assert_error(c.get("/props"), 401, "authentication_error")       # missing key
        assert_error(c.get("/props", headers={"Authorization": "Bearer wrong"}), 401, "authentication_error")
        assert c.get("/props", headers={"Authorization": "Bearer key-one"}).status_code == 200
        assert c.get("/v1/models", headers={"Authorization": "Bearer key-two"}).status_code == 200
        assert c.get("/props", headers={"X-Api-Key": "key-two"}).status_code == 200
        assert_error(c.post("/completion", json={"prompt": "x"}), 401)


def test_chat_template_file(secure):
    url, ca = secure
    r = httpx.post(url + "/apply-template", verify=ssl.create_default_context(cafile=ca),
                   headers={"Authorization": "Bearer key-one"}, json={"messages": [{"role": "user", "content": "Hi"}]})
    assert r.json() == {"prompt": "[user] Hi\n[assistant] "}


def test_disabled_endpoints_501(secure):
    url, ca = secure
    h = {"Authorization": "Bearer key-one"}
    ctx = ssl.create_default_context(cafile=ca)
    assert_error(httpx.get(url + "/metrics", verify=ctx, headers=h), 501, "not_supported_error")
    assert_error(httpx.get(url + "/slots", verify=ctx, headers=h), 501, "not_supported_error")


def test_timeout_ends_a_request_that_gets_no_result(synth):
    from llamarpc.client.local import LocalBackend
    from llamarpc.frontend.api import ServerSettings, ServerState, create_app
    from llamarpc.frontend.engine import Engine, load_model

    state = ServerState(ServerSettings(model_path=str(synth), timeout=0.5))
    model = load_model(str(synth), [LocalBackend()], n_ctx=256)
    engine = Engine(model)                 # never started: nothing will answer
    state.attach(model, engine)
    app = AppThread(create_app(state))
    try:
        t0 = time.monotonic()
        msg = assert_error(httpx.post(app.url + "/completion", json={"prompt": "x"}, timeout=10), 503)
        assert "timeout" in msg and time.monotonic() - t0 < 5
        assert all(t.cancelled for t in list(engine._inbox.queue) if t is not None)
    finally:
        app.stop()
        model.close()


def test_node_lost_over_http(synth):
    from llamarpc.frontend.api import ServerSettings, ServerState, create_app
    from llamarpc.frontend.engine import Engine, EngineConfig, load_model
    from test_engine import FlakyBackend

    flaky = FlakyBackend()
    state = ServerState(ServerSettings(model_path=str(synth), n_parallel=2))
    model = load_model(str(synth), [flaky], n_ctx=512)   # lost, its layers fit nowhere: streams end
    engine = Engine(model, EngineConfig(n_parallel=2, node_grace=0.2))
    engine.start()
    state.attach(model, engine)
    app = AppThread(create_app(state))
    try:
        with httpx.Client(base_url=app.url, timeout=30) as c:
            with c.stream("POST", "/completion", json={"prompt": "Hello", "n_predict": 200, "stream": True,
                                                       **GREEDY}) as s:
                lines = s.iter_lines()
                events = [json.loads(next(x for x in lines if x.startswith("data: "))[6:])]
                flaky.down = True
                events += list(sse_events(lines))
            assert "error" in events[-1] and events[-1]["error"]["code"] == 503
            assert "flaky:1" in events[-1]["error"]["message"]
            flaky.down = False
            while c.get("/health").status_code != 200:
                time.sleep(0.05)
            box: dict = {}
            t = threading.Thread(target=lambda: box.update(r=c.post("/completion", json={
                "prompt": "Hello", "n_predict": 200, **GREEDY})))
            t.start()
            while not any(x.busy for x in engine.slots):
                time.sleep(0.002)
            time.sleep(0.02)
            flaky.down = True
            t.join(30)
            assert_error(box["r"], 503, "unavailable_error")                  # non-streamed: a 503
            msg = assert_error(c.get("/health"), 503, "unavailable_error")
            assert "flaky:1" in msg
            assert_error(c.post("/completion", json={"prompt": "Hello", "n_predict": 4}), 503, "unavailable_error")
            flaky.down = False
            deadline = time.time() + 10
            while c.get("/health").status_code != 200 and time.time() < deadline:
                time.sleep(0.1)
            assert c.get("/health").json() == {"status": "ok", "nodes": [
                {"name": "flaky:1", "state": "attached", "layers": "0-1"}]}
            assert c.post("/completion", json={"prompt": "Hello", "n_predict": 4}).status_code == 200
    finally:
        app.stop()
        engine.stop()
        model.close()


def test_cli_serves_with_llama_arg_environment(synth):
    from serverproc import free_port

    port = free_port()
    proc, url = cli_server(["-m", str(synth), "-c", "256"], port=port,
                           env={"LLAMA_ARG_PORT": str(port), "LLAMA_ARG_N_PARALLEL": "2",
                                "LLAMA_ARG_ENDPOINT_METRICS": "1", "LLAMA_ARG_ALIAS": "from-env"})
    try:
        assert httpx.get(url + "/props").json()["total_slots"] == 2
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "from-env"
        assert httpx.get(url + "/metrics").status_code == 200
    finally:
        proc.terminate()
        proc.wait(20)


def test_real_node_killed_mid_stream_then_back(synth, tmp_path):
    """--rpc over two real llamarpc-server processes; one is killed -9 mid-stream and restarted
    2 s later: the stream pauses and goes on with the undisturbed text; /health and /metrics say so."""
    from nodeproc import start_node

    nodes = [start_node(tmp_path), start_node(tmp_path)]
    srv = None
    try:
        srv, url = start_server(["-m", str(synth), "-c", "512", "-np", "2", "-ts", "1,1", "--metrics",
                                 "--rpc", ",".join(n.address for n in nodes)])
        body = {"prompt": "Hello", "n_predict": 120, "cache_prompt": False, **GREEDY}
        with httpx.Client(base_url=url, timeout=60) as c:
            ok = c.post("/completion", json=body).json()["content"]
            with c.stream("POST", "/completion", json={**body, "stream": True}) as s:
                lines = s.iter_lines()
                first = json.loads(next(x for x in lines if x.startswith("data: "))[6:])
                nodes[1].kill9()
                restart = threading.Timer(2.0, nodes[1].restart)
                restart.start()
                events = [first, *sse_events(lines)]
                restart.join()
            assert "error" not in events[-1] and events[-1]["stop"]
            assert "".join(e["content"] for e in events) == ok
            h = c.get("/health").json()
            assert h["status"] == "ok" and [n["state"] for n in h["nodes"]] == ["attached", "attached"]
            metrics = c.get("/metrics").text
            assert "llamarpc:node_reattached_total 1" in metrics
            # prometheus-client writes labels sorted by name
            assert f'llamarpc:node_up{{layers="1-1",node="{nodes[1].address}",state="attached"}} 1' in metrics
            # per node: only the restarted one re-attached; the KV cache was rebuilt in replay steps
            assert f'llamarpc:node_reattaches_total{{node="{nodes[1].address}"}} 1.0' in metrics
            assert f'llamarpc:node_reattaches_total{{node="{nodes[0].address}"}} 0.0' in metrics
            replay = re.search(r'^llamarpc:step_seconds_count\{kind="replay"\} (\S+)$', metrics, re.M)
            assert replay and float(replay.group(1)) >= 1, metrics
            assert c.post("/completion", json=body).json()["content"] == ok
    finally:
        if srv is not None:
            srv.stop()
        for n in nodes:
            n.stop()
