"""LoRA over HTTP, as llama-server: --lora / --lora-scaled / --lora-init-without-apply, GET and POST
/lora-adapters, a request's `lora` field overriding the global scales, bad input as 400s, and a
wrong adapter as a one-line startup error of the real CLI."""
from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
from serverproc import start_server
from synth import write_model
from synth_lora import merged, write_adapter

GREEDY = {"temperature": 0, "ignore_eos": True, "n_predict": 12, "cache_prompt": True}
PROMPT = "hello world, the"
SHAPE = dict(n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, seed=5, tied=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora_server")
    m = write_model(d / "base.gguf", **SHAPE)
    a = write_adapter(d / "a.gguf", m, rank=8, alpha=8.0, seed=11, extra=("output.weight",))
    write_adapter(d / "b.gguf", m, rank=4, alpha=4.0, seed=12, targets=("ffn_up",))
    write_model(d / "merged.gguf", **SHAPE, replace=merged(m, [(a, 1.0, 8.0)]))
    return d


def _text(http: httpx.Client, **body) -> str:
    r = http.post("/completion", json={"prompt": PROMPT, **GREEDY, **body})
    assert r.status_code == 200, r.text
    return r.json()["content"]


@pytest.fixture(scope="module")
def expected(files):
    """What the base model and the merged model (base + adapter a at scale 1) generate."""
    out = {}
    for name in ("base", "merged"):
        srv, url = start_server(["-m", str(files / f"{name}.gguf"), "-c", "256"])
        try:
            with httpx.Client(base_url=url, timeout=60) as c:
                out[name] = _text(c)
        finally:
            srv.stop()
    assert out["base"] != out["merged"]
    return out


@pytest.fixture(scope="module")
def http(files):
    srv, url = start_server(["-m", str(files / "base.gguf"), "-c", "512", "-np", "2",
                             "--lora-scaled", str(files / "a.gguf"), "0.5", "--lora", str(files / "b.gguf"),
                             "--lora-init-without-apply"])
    with httpx.Client(base_url=url, timeout=60) as c:
        yield c
    srv.stop()


def test_list_and_set_global_scales(http, files, expected):
    r = http.get("/lora-adapters")
    assert r.status_code == 200
    assert r.json() == [{"id": 0, "path": str(files / "a.gguf"), "scale": 0.0, "task_name": "", "prompt_prefix": ""},
                        {"id": 1, "path": str(files / "b.gguf"), "scale": 0.0, "task_name": "", "prompt_prefix": ""}]
    assert _text(http) == expected["base"]                 # loaded without apply: scale 0
    r = http.post("/lora-adapters", json=[{"id": 0, "scale": 1.0}])
    assert r.status_code == 200 and r.json() == {"success": True}
    assert [a["scale"] for a in http.get("/lora-adapters").json()] == [1.0, 0.0]
    assert _text(http) == expected["merged"]
    assert http.post("/lora-adapters", json=[]).status_code == 200      # not listed: 0
    assert [a["scale"] for a in http.get("/lora-adapters").json()] == [0.0, 0.0]
    assert _text(http) == expected["base"]


def test_request_lora_overrides_global(http, expected):
    http.post("/lora-adapters", json=[{"id": 0, "scale": 1.0}])
    try:
        assert _text(http, lora=[]) == expected["base"]                       # every adapter 0
        assert _text(http, lora=[{"id": 1, "scale": 0.0}]) == expected["base"]
        assert _text(http) == expected["merged"]                               # the global scales
        http.post("/lora-adapters", json=[])
        assert _text(http, lora=[{"id": 0, "scale": 1.0}]) == expected["merged"]
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                     "lora": [{"id": 0, "scale": 1.0}], "max_tokens": 2})
        assert r.status_code == 200, r.text
    finally:
        http.post("/lora-adapters", json=[])


def test_bad_lora_input_is_400(http):
    for body in ({"id": 0}, [{"id": 5, "scale": 1}], [{"id": 0, "scale": "big"}], ["x"]):
        r = http.post("/lora-adapters", json=body)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
        r = http.post("/completion", json={"prompt": PROMPT, "n_predict": 1, "lora": body})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    assert "invalid adapter id" in http.post("/lora-adapters", json=[{"id": 2, "scale": 1}]).json()["error"]["message"]


def test_wrong_adapter_is_a_startup_error(files, tmp_path):
    other = write_model(tmp_path / "other.gguf", n_layer=2, n_embd=32, n_head=4, n_head_kv=2, n_ff=64)
    bad = tmp_path / "bad.gguf"
    write_adapter(bad, other)
    p = subprocess.run([sys.executable, "-m", "llamarpc.frontend.cli", "-m", str(files / "base.gguf"), "-p", "hi",
                        "-n", "1", "--lora", str(bad)], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "has an incorrect shape" in p.stderr and str(bad) in p.stderr
    assert "Traceback" not in p.stderr


def test_random_lora_json_never_5xx(http):
    import json

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    leaf = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6)
    entry = st.fixed_dictionaries({}, optional={"id": leaf, "scale": leaf}) | leaf
    bodies = st.lists(entry, max_size=4) | leaf | st.dictionaries(st.text(max_size=4), leaf, max_size=2)

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(bodies)
    def check(body):
        for path, payload in (("/lora-adapters", body), ("/completion", {"prompt": "a", "n_predict": 1, "lora": body})):
            r = http.post(path, content=json.dumps(body if path == "/lora-adapters" else payload))
            assert r.status_code in (200, 400), (path, body, r.text)
            if r.status_code == 400:
                assert r.json()["error"]["code"] == 400

    try:
        check()
    finally:
        http.post("/lora-adapters", json=[])
    assert all(a["scale"] == 0.0 for a in http.get("/lora-adapters").json())
