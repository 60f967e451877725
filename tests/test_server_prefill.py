"""A long prompt arriving over HTTP while streams decode, on the tiny synthetic model: its prefill
goes in chunks (-pc 16 here; the default sizes chunks from measured step times, tests/test_budget.py)
beside the streams' tokens, so the streams keep receiving tokens before the long request's first
token, and go on after it. Timings are measured by scripts/bench_server.py, never asserted here."""
from __future__ import annotations

import threading
import time

import httpx
import pytest
from serverproc import sse_events, start_server
from synth import write_model

N_STREAMS = 4
N_LONG = 400        # prompt tokens of the long request
CHUNK = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefill") / "synth.gguf"
    write_model(path, n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=256, seed=3)
    srv, url = start_server(["-m", str(path), "-c", "8192", "-np", str(N_STREAMS + 1), "-pc", str(CHUNK)])
    yield srv, url
    srv.stop()


def test_long_prompt_does_not_stall_running_streams(server, monkeypatch):
    srv, url = server
    pipeline = srv.state.engine.model.pipeline
    steps: list[tuple[int, int]] = []       # (tokens in the forward, rows sampled from)
    forward = pipeline.forward

    def spy(tokens, pos, seq, cells, kv_pos, kv_seq, out_rows):
        steps.append((len(tokens), len(out_rows)))
        return forward(tokens, pos, seq, cells, kv_pos, kv_seq, out_rows)

    monkeypatch.setattr(pipeline, "forward", spy)
    stamps: list[list[float]] = [[] for _ in range(N_STREAMS)]
    started = threading.Barrier(N_STREAMS + 1)
    long_done = threading.Event()
    t_first = [0.0]

    def stream(i: int) -> None:
        # long enough never to end by itself here; it goes away (cancelled) once it has shown a
        # token after the long request's first one
        with httpx.stream("POST", url + "/completion", timeout=60, json={
                "prompt": f"Count from {i}:", "n_predict": 1500, "temperature": 0, "ignore_eos": True,
                "stream": True, "cache_prompt": False}) as r:
            for n, _ev in enumerate(sse_events(r.iter_lines())):
                stamps[i].append(time.perf_counter())
                if n == 2:
                    started.wait()
                if long_done.is_set() and stamps[i][-1] > t_first[0]:
                    break

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(N_STREAMS)]
    for t in threads:
        t.start()
    started.wait()
    mark = len(steps)
    t_send = time.perf_counter()
    with httpx.stream("POST", url + "/completion", timeout=60, json={
            "prompt": [3 + i % 250 for i in range(N_LONG)], "n_predict": 2, "stream": True, "temperature": 0}) as r:
        events = sse_events(r.iter_lines())
        next(events)
        t_first[0] = time.perf_counter()
        n_prompt = [e for e in events][-1]["tokens_evaluated"]
    long_done.set()
    for t in threads:
        t.join(60)
    assert n_prompt == N_LONG
    during = [sum(t_send < s < t_first[0] for s in st) for st in stamps]
    assert all(n >= 2 for n in during), during        # every stream kept decoding during the prefill
    assert all(st[-1] > t_first[0] for st in stamps)  # ... and went on after it
    chunks = [(n, rows) for n, rows in steps[mark:] if n > N_STREAMS + 1]
    assert len(chunks) >= N_LONG // CHUNK             # the prompt went in chunks ...
    assert all(n <= N_STREAMS + CHUNK and rows >= N_STREAMS for n, rows in chunks)  # ... beside every stream
