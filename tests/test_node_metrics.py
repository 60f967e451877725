"""A real node's own /metrics (`llamarpc-server --metrics-port`): every name README's "Metrics"
table documents is served; the counters move when a frontend computes through the node (and the
frontend's per-node counters agree with the node's); the second load is answered from the weight
cache; refused calls are counted by code; no port is opened without the flag; with a token a
scrape needs it, with TLS it is HTTPS, and a stalled scraper blocks neither scrapes nor compute."""
from __future__ import annotations

import os
import re
import socket
import ssl
import time
from pathlib import Path

import grpc
import httpx
import pytest
from llamarpc.client.remote import RemoteBackend
from llamarpc.proto import pb, pb_grpc
from metricsdoc import documented, families, served, value
from nodeproc import NodeProc, channel, start_node
from serverproc import start_server
from synth import write_model
from test_node_security import make_cert, matmul_roundtrip

N = 6
TOKEN = "metrics-test-token-0123456789"


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "https_proxy", "grpc_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")


def metrics_url(node: NodeProc) -> str:
    """The latest process's (a restarted node logs to the same file; port 0 picks a new port)."""
    found = re.findall(r"metrics on (https?://\S+:\d+/metrics)", node.stderr_text())
    assert found, node.stderr_text()
    return found[-1]


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on (its socket inodes in /proc/net/tcp{,6}, state 0A)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        m = re.fullmatch(r"socket:\[(\d+)\]", target)
        if m:
            inodes.add(m.group(1))
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("nm") / "synth.gguf"
    write_model(path, n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, seed=3)
    return path


@pytest.fixture(scope="module")
def metered(tmp_path_factory):
    node = start_node(tmp_path_factory.mktemp("metered"), "--metrics-port", "0", "--mem", "256")
    yield node, metrics_url(node)
    node.stop()


def _scrape(url: str, **kw) -> dict:
    r = httpx.get(url, timeout=10, **kw)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return families(r.text)


def _frontend(model: Path, node: NodeProc):
    return start_server(["-m", str(model), "-c", "256", "--metrics", "--ignore-eos", "-t", "1",
                         "--rpc", node.address])


def _chat(url: str) -> dict:
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hello"}],
                                                 "max_tokens": N, "temperature": 0})
        assert r.status_code == 200, r.text
        return families(c.get("/metrics").text)


def _wait(predicate, what: str, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_documented_node_metrics_served_and_counters_move_when_it_computes(metered, model):
    node, url = metered
    before = _scrape(url)
    missing = [n for n in documented("node") if not served(before, n)]
    assert not missing, missing
    assert value(before, "llamarpc_server:sessions") == 0
    srv, front = _frontend(model, node)
    try:
        fe = _chat(front)
        after = _scrape(url)
    finally:
        srv.stop()

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert value(after, "llamarpc_server:sessions") == 1
    calls = moved("llamarpc_server:compute_calls_total")
    assert calls >= N and moved("llamarpc_server:compute_seconds_total") > 0
    assert moved("llamarpc_server:received_bytes_total") >= model.stat().st_size // 2   # the weights came
    assert moved("llamarpc_server:sent_bytes_total") > 0                                 # logits went back
    assert moved("llamarpc_server:weight_cache_misses_total") > 0                        # a fresh cache
    assert moved("llamarpc_server:weight_cache_hits_total") == 0
    for kind in ("weights", "kv"):
        assert value(after, "llamarpc_server:held_bytes", kind=kind) > 0, kind
        assert value(after, "llamarpc_server:buffers", kind=kind) >= 1, kind
    assert value(after, "llamarpc_server:held_bytes", kind="scratch") >= 0
    assert value(after, "llamarpc_server:memory_used_bytes") >= value(after, "llamarpc_server:held_bytes",
                                                                      kind="weights")
    # the frontend's view of the same node: the same Computes, the node's seconds, bytes both ways
    who = {"node": node.address}
    assert value(fe, "llamarpc:node_compute_calls_total", **who) == calls
    # the node reports each Compute's seconds with its lock wait; its own counter times the execution
    assert value(fe, "llamarpc:node_compute_seconds_total", **who) >= moved("llamarpc_server:compute_seconds_total")
    assert value(fe, "llamarpc:node_sent_bytes_total", **who) >= moved("llamarpc_server:received_bytes_total")
    assert value(fe, "llamarpc:node_received_bytes_total", **who) >= moved("llamarpc_server:sent_bytes_total")
    assert value(fe, "llamarpc:node_weight_cache_misses_total", **who) > 0
    assert value(fe, "llamarpc:node_weight_cache_hits_total", **who) == 0

    # the frontend went away: its session and buffers are freed; a second one finds its weights cached
    _wait(lambda: value(_scrape(url), "llamarpc_server:sessions") == 0, "the session to close")
    assert value(_scrape(url), "llamarpc_server:held_bytes", kind="weights") == 0
    srv, front = _frontend(model, node)
    try:
        fe = _chat(front)
        again = _scrape(url)
    finally:
        srv.stop()
    hits = value(again, "llamarpc_server:weight_cache_hits_total")
    assert hits > 0 and value(again, "llamarpc_server:weight_cache_misses_total") == value(
        after, "llamarpc_server:weight_cache_misses_total")
    assert value(fe, "llamarpc:node_weight_cache_hits_total", **who) == hits


def test_refused_calls_are_counted_by_code(metered):
    node, url = metered
    code = {"code": "FAILED_PRECONDITION"}
    before = value(_scrape(url), "llamarpc_server:rejected_requests_total", **code)
    with channel(node.address) as ch:
        stub = pb_grpc.BackendStub(ch)
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as e:
                stub.AllocBuffer(pb.AllocBufferRequest(size=64), timeout=10)   # no session
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    after = _scrape(url)
    assert value(after, "llamarpc_server:rejected_requests_total", **code) == before + 3
    assert value(after, "llamarpc_server:rejected_requests_total", code="INVALID_ARGUMENT") == 0


def test_metrics_are_off_by_default(tmp_path):
    node = start_node(tmp_path)
    try:
        assert listening_ports(node.pid) == {node.port}
        assert "metrics on" not in node.stderr_text()
    finally:
        node.stop()


def test_token_and_tls_as_the_grpc_port_and_a_stalled_scraper_blocks_nothing(tmp_path):
    cert, key = make_cert(tmp_path)
    (tmp_path / "token").write_text(TOKEN + "\n")
    node = start_node(tmp_path, "--metrics-port", "0", "--mem", "64", "--auth-token-file", str(tmp_path / "token"),
                      "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        url = metrics_url(node)
        assert url.startswith("https://127.0.0.1:")
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        assert listening_ports(node.pid) == {node.port, port}
        tls = ssl.create_default_context(cafile=str(cert))
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                        {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": f"bearer {TOKEN}"}):
            r = httpx.get(url, headers=headers, verify=tls, timeout=10)
            assert r.status_code == 401, (headers, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer" and "llamarpc_server" not in r.text
        with pytest.raises(httpx.HTTPError):      # plain HTTP on the TLS port
            httpx.get(url.replace("https://", "http://"), headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
        # connections that never finish their TLS handshake: a scrape and a Compute go on meanwhile
        stalled = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
        try:
            t0 = time.monotonic()
            fams = _scrape(url, headers={"Authorization": f"Bearer {TOKEN}"}, verify=tls)
            backend = RemoteBackend(node.address, token=TOKEN, tls_ca=cert.read_bytes(), timeout=10)
            try:
                matmul_roundtrip(backend)
            finally:
                backend.close()
            assert time.monotonic() - t0 < 5
            after = _scrape(url, headers={"Authorization": f"Bearer {TOKEN}"}, verify=tls)
        finally:
            for s in stalled:
                s.close()
        assert value(after, "llamarpc_server:compute_calls_total") == value(fams, "llamarpc_server:compute_calls_total") + 1
        assert value(after, "llamarpc_server:rejected_requests_total", code="UNAUTHENTICATED") == 0   # gRPC only
        assert httpx.get(url.replace("/metrics", "/other"), headers={"Authorization": f"Bearer {TOKEN}"},
                         verify=tls, timeout=10).status_code == 404
    finally:
        node.stop()


def test_a_restarted_node_counts_one_reattach_on_the_frontend(tmp_path, model):
    node = start_node(tmp_path, "--metrics-port", "0", "--mem", "256")
    srv, front = _frontend(model, node)
    try:
        fe = _chat(front)
        who = {"node": node.address}
        assert value(fe, "llamarpc:node_reattaches_total", **who) == 0
        node.restart()                       # same port, a fresh process: the session is gone
        fe = _chat(front)                    # re-attached during this request, which still succeeds
        assert value(fe, "llamarpc:node_reattaches_total", **who) == 1
        assert value(fe, "llamarpc:node_up", node=node.address, state="attached", layers="0-1") == 1
        assert value(fe, "llamarpc:node_weight_cache_hits_total", **who) > 0   # weights from its cache
        fams = _scrape(metrics_url(node))
        assert value(fams, "llamarpc_server:sessions") == 1
        assert value(fams, "llamarpc_server:weight_cache_hits_total") > 0
    finally:
        srv.stop()
        node.stop()


def test_a_busy_metrics_port_is_one_error_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        node = NodeProc(tmp_path, ("--metrics-port", str(port)))
        with pytest.raises(RuntimeError, match="exited with 1"):
            node._start(0)
    err = [line for line in node.stderr_text().splitlines() if "error" in line]
    assert err == [f"llamarpc-server: error: --metrics-port: cannot listen on 127.0.0.1:{port}: Address already in use"]
