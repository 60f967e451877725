"""/metrics through prometheus-client: valid exposition text, llama.cpp's llamacpp:* names kept,
and after one streamed request the request histograms (time to first token, inter-token latency,
queue wait) and the process's RSS and CPU are there and counted; every name README's "Metrics"
table documents is served, the step-time histogram counts steps by kind and the per-node counters
of the in-process node move as it computes."""
from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from metricsdoc import documented, families, served, value
from prometheus_client.parser import text_string_to_metric_families
from serverproc import start_server
from synth import write_model

LLAMACPP = ("prompt_tokens_total", "prompt_seconds_total", "tokens_predicted_total", "tokens_predicted_seconds_total",
            "n_decode_total", "n_tokens_max", "prompt_tokens_seconds", "predicted_tokens_seconds",
            "n_busy_slots_per_decode", "kv_cache_usage_ratio", "kv_cache_tokens", "requests_processing",
            "requests_deferred")
N = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("metrics") / "synth.gguf"
    write_model(path, n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, seed=7)
    srv, url = start_server(["-m", str(path), "-c", "256", "--metrics", "--ignore-eos", "-t", "1"])
    yield url
    srv.stop()


def _samples(text: str) -> dict[str, float]:
    out = {}
    for fam in text_string_to_metric_families(text):      # raises on text that is not valid exposition
        for s in fam.samples:
            out[s.name] = s.value
    return out


def test_every_documented_metric_after_one_request(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        with c.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Hello"}], "max_tokens": N, "temperature": 0,
                "stream": True}) as r:
            assert r.status_code == 200
            r.read()
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    s = _samples(r.text)
    for name in LLAMACPP:
        assert f"llamacpp:{name}" in s, name
    assert s["llamacpp:tokens_predicted_total"] >= N
    assert "# TYPE llamacpp:prompt_tokens_total counter" in r.text
    assert s["llamarpc:time_to_first_token_seconds_count"] == 1
    assert s["llamarpc:time_to_first_token_seconds_sum"] > 0
    assert s["llamarpc:inter_token_latency_seconds_count"] == N - 1
    assert s["llamarpc:queue_wait_seconds_count"] == 1
    assert s["llamarpc:node_up"] == 1 and "llamarpc:node_losses_total" in s
    assert s["process_resident_memory_bytes"] > 1 << 20 and s["process_cpu_seconds_total"] > 0


def _chat(c: httpx.Client) -> None:
    with c.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hi there"}], "max_tokens": N, "temperature": 0,
            "stream": True}) as r:
        assert r.status_code == 200
        r.read()


def test_documented_names_step_time_and_node_counters_move(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        before = families(c.get("/metrics").text)
        _chat(c)
        after = families(c.get("/metrics").text)
    missing = [n for n in documented("frontend") if not served(after, n)]
    assert not missing, missing

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # one prompt step, then decode steps (one token each; the first comes from the prompt step)
    assert moved("llamarpc:step_seconds_count", kind="prompt") == 1
    assert moved("llamarpc:step_seconds_count", kind="decode") == N - 1
    assert moved("llamarpc:step_seconds_count", kind="mixed") == 0
    assert moved("llamarpc:step_seconds_sum", kind="decode") > 0
    node = {"node": "local:cpu"}
    assert moved("llamarpc:node_compute_calls_total", **node) == N
    assert moved("llamarpc:node_compute_seconds_total", **node) > 0
    assert value(after, "llamarpc:node_reattaches_total", **node) == 0
    assert value(after, "llamarpc:node_up", node="local:cpu", state="attached", layers="0-1") == 1


def test_the_grafana_dashboard_uses_only_names_we_export(server):
    """deploy/grafana-dashboard.json: every metric a panel queries is one /metrics serves."""
    dash = json.loads((Path(__file__).resolve().parent.parent / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    names = {n for e in exprs for n in re.findall(r"\b((?:llamacpp|llamarpc):[a-z_]+|process_[a-z_]+)", e)}
    assert len(names) >= 10
    exported = set(_samples(httpx.get(server + "/metrics").text))
    assert names <= exported, sorted(names - exported)


def test_a_prompt_beside_a_decoding_stream_is_a_mixed_step(tmp_path):
    path = tmp_path / "synth.gguf"
    write_model(path, n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, seed=7)
    srv, url = start_server(["-m", str(path), "-c", "512", "-np", "2", "--metrics", "--ignore-eos", "-t", "1"])
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            with c.stream("POST", "/completion", json={"prompt": "Hello", "n_predict": 120, "temperature": 0,
                                                       "stream": True}) as r:
                lines = r.iter_lines()
                next(x for x in lines if x.startswith("data: "))       # the first stream decodes now
                assert c.post("/completion", json={"prompt": "Another prompt", "n_predict": 2}).status_code == 200
                for _ in lines:
                    pass
            fams = families(c.get("/metrics").text)
    finally:
        srv.stop()
    assert value(fams, "llamarpc:step_seconds_count", kind="mixed") >= 1
    assert value(fams, "llamarpc:step_seconds_count", kind="replay") == 0
