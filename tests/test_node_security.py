"""A node on a network: token auth, TLS, sessions freed when their client goes away, the session
cap, and the warning when listening beyond loopback. Every node here is a real ``llamarpc-server``
subprocess on 127.0.0.1 (tests/nodeproc.py); no traffic goes anywhere else."""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from llamarpc.client import GraphBuilder, TensorRef
from llamarpc.client.remote import RemoteBackend
from llamarpc.proto import PROTOCOL_VERSION, pb, pb_grpc
from llamarpc.proto.errors import NodeUnavailable, Unauthenticated
from llamarpc.proto.types import GGMLType as T
from nodeproc import NodeProc, channel, health_status, start_node

SESSION_KEY = "llamarpc-session"
TOKEN = "s3cret-token-for-tests"
TIMEOUT = 10.0
MEM_MIB = 64


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """RemoteBackend's channels read the proxy variables: make sure nothing leaves 127.0.0.1."""
    for var in ("http_proxy", "https_proxy", "grpc_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")


@pytest.fixture
def stop_later():
    nodes: list[NodeProc] = []
    yield nodes.append
    for n in nodes:
        n.stop()


def matmul_roundtrip(backend: RemoteBackend) -> None:
    """Weights in a buffer, a registered graph, one Compute checked against numpy."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 8)).astype(np.float32)
    buf = backend.alloc_buffer(w.nbytes)
    backend.set_tensor(buf, 0, w)
    gb = GraphBuilder()
    x = gb.input("x", T.F32, ("n", 8))
    gb.output("y", gb.rms_norm(gb.matmul(x, gb.tensor(TensorRef(buf, 0, T.F32, (4, 8)))), 1e-5))
    gid = backend.register_graph(gb.build())
    xs = rng.standard_normal((3, 8)).astype(np.float32)
    y = backend.compute(gid, {"x": xs})["y"]
    ref = xs @ w.T
    np.testing.assert_allclose(y, ref / np.sqrt(np.mean(ref * ref, -1, keepdims=True) + 1e-5), rtol=1e-4, atol=1e-5)
    backend.free_buffer(buf)


def every_rpc(stub: pb_grpc.BackendStub, metadata: list[tuple[str, str]]) -> dict[str, Any]:
    """Call each rpc once with `metadata`; the status code each one ended with."""
    calls = {
        "Hello": lambda md: next(stub.Hello(pb.HelloRequest(protocol_version=PROTOCOL_VERSION), metadata=md,
                                            timeout=TIMEOUT)),
        "GetMemory": lambda md: stub.GetMemory(pb.GetMemoryRequest(), metadata=md, timeout=TIMEOUT),
        "AllocBuffer": lambda md: stub.AllocBuffer(pb.AllocBufferRequest(size=64), metadata=md, timeout=TIMEOUT),
        "FreeBuffer": lambda md: stub.FreeBuffer(pb.BufferRequest(buffer_id=1), metadata=md, timeout=TIMEOUT),
        "ClearBuffer": lambda md: stub.ClearBuffer(pb.ClearBufferRequest(buffer_id=1), metadata=md, timeout=TIMEOUT),
        "SetTensor": lambda md: stub.SetTensor(iter([pb.SetTensorChunk(
            header=pb.SetTensorHeader(buffer_id=1, size=4), data=b"abcd")]), metadata=md, timeout=TIMEOUT),
        "SetTensorFromCache": lambda md: stub.SetTensorFromCache(pb.SetTensorFromCacheRequest(
            buffer_id=1, size=4, sha256=b"\0" * 32), metadata=md, timeout=TIMEOUT),
        "GetTensor": lambda md: list(stub.GetTensor(pb.GetTensorRequest(buffer_id=1, size=4), metadata=md,
                                                    timeout=TIMEOUT)),
        "CopyTensor": lambda md: stub.CopyTensor(pb.CopyTensorRequest(src_buffer_id=1, dst_buffer_id=1, size=4),
                                                 metadata=md, timeout=TIMEOUT),
        "RegisterGraph": lambda md: stub.RegisterGraph(pb.RegisterGraphRequest(), metadata=md, timeout=TIMEOUT),
        "ReleaseGraph": lambda md: stub.ReleaseGraph(pb.ReleaseGraphRequest(graph_id=1), metadata=md,
                                                     timeout=TIMEOUT),
        "Compute": lambda md: stub.Compute(pb.ComputeRequest(graph_id=1), metadata=md, timeout=TIMEOUT),
    }
    assert set(calls) == set(pb.DESCRIPTOR.services_by_name["Backend"].methods_by_name)
    codes = {}
    for name, call in calls.items():
        try:
            call(metadata)
            codes[name] = grpc.StatusCode.OK
        except grpc.RpcError as e:
            codes[name] = e.code()
    return codes


def wait_for(predicate, timeout: float = 15.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- auth -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def auth_node(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("auth")
    (tmp / "token").write_text(TOKEN + "\n")
    node = start_node(tmp, "--auth-token-file", str(tmp / "token"), "--mem", str(MEM_MIB))
    yield node
    node.stop()


def test_auth_missing_or_wrong_token_is_unauthenticated_on_every_rpc(auth_node):
    with channel(auth_node.address) as ch:
        stub = pb_grpc.BackendStub(ch)
        good = next(stub.Hello(pb.HelloRequest(protocol_version=PROTOCOL_VERSION),
                               metadata=[("authorization", f"Bearer {TOKEN}")], timeout=TIMEOUT))
        for md in ([], [(SESSION_KEY, good.session_id)],
                   [("authorization", "Bearer wrong"), (SESSION_KEY, good.session_id)],
                   [("authorization", TOKEN)],                                   # no "Bearer "
                   [("authorization", f"Bearer {TOKEN}x")], [("authorization", f"Bearer {TOKEN[:-1]}")],
                   [("authorization", "Bearer ")], [("authorization", f"bearer {TOKEN}")]):
            codes = every_rpc(stub, md)
            assert all(c == grpc.StatusCode.UNAUTHENTICATED for c in codes.values()), (md, codes)
    assert auth_node.alive()


def test_auth_health_answers_without_token(auth_node):
    assert health_status(auth_node.address) == health_pb2.HealthCheckResponse.SERVING
    assert health_status(auth_node.address, service="llamarpc.v1.Backend") == health_pb2.HealthCheckResponse.SERVING


def test_auth_right_token_works_and_wrong_token_is_refused(auth_node):
    backend = RemoteBackend(auth_node.address, token=TOKEN, timeout=TIMEOUT)
    try:
        assert backend.hello().device == "cpu"
        matmul_roundtrip(backend)
    finally:
        backend.close()
    for token in (None, "wrong"):
        with pytest.raises(Unauthenticated):
            RemoteBackend(auth_node.address, token=token, timeout=TIMEOUT, connect_timeout=5)


# -- TLS --------------------------------------------------------------------------------------------
def make_cert(directory: Path, name: str = "node") -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 (its own root), made with the openssl CLI."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed")
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = make_cert(tmp)
    node = start_node(tmp, "--tls-cert", str(cert), "--tls-key", str(key), "--mem", str(MEM_MIB))
    yield node, cert.read_bytes(), tmp
    node.stop()


@pytest.mark.parametrize("server_name", [None, "localhost"])
def test_tls_client_with_the_cert_computes(tls_node, server_name):
    node, cert_pem, _ = tls_node
    backend = RemoteBackend(node.address, tls_ca=cert_pem, tls_server_name=server_name, timeout=TIMEOUT)
    try:
        matmul_roundtrip(backend)
    finally:
        backend.close()


def test_tls_plaintext_or_untrusting_client_is_unavailable(tls_node):
    node, _, tmp = tls_node
    with pytest.raises(NodeUnavailable):
        RemoteBackend(node.address, timeout=5, connect_timeout=5)
    stranger, _ = make_cert(tmp, "stranger")           # a certificate the node's is not signed by
    with pytest.raises(NodeUnavailable):
        RemoteBackend(node.address, tls_ca=stranger.read_bytes(), timeout=5, connect_timeout=5)
    with pytest.raises(NodeUnavailable):               # the right root, the wrong name
        RemoteBackend(node.address, tls_ca=node.tls_ca, tls_server_name="not-the-node.example", timeout=5,
                      connect_timeout=5)
    assert node.alive()


# -- sessions ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain_node(tmp_path_factory: pytest.TempPathFactory):
    node = start_node(tmp_path_factory.mktemp("plain"), "--mem", str(MEM_MIB))
    yield node
    node.stop()


def free_bytes(node: NodeProc) -> int:
    with channel(node.address) as ch:
        return pb_grpc.BackendStub(ch).GetMemory(pb.GetMemoryRequest(), timeout=TIMEOUT).free_bytes


def test_session_freed_when_client_closes(plain_node):
    free0 = free_bytes(plain_node)
    backend = RemoteBackend(plain_node.address, timeout=TIMEOUT)
    for _ in range(3):
        backend.alloc_buffer(1 << 20)
    # a quantized weight behind a MATMUL: its buffer is all it costs (no float copy)
    q = backend.alloc_buffer(4096)
    gb = GraphBuilder()
    x = gb.input("x", T.F32, ("n", 64))
    gb.output("y", gb.matmul(x, gb.tensor(TensorRef(q, 0, T.Q8_0, (16, 64)))))
    backend.register_graph(gb.build())
    assert free_bytes(plain_node) == free0 - (3 << 20) - 4096
    backend.close()
    wait_for(lambda: free_bytes(plain_node) == free0, what="the closed session's memory to come back")


CLIENT = textwrap.dedent("""
    import sys, time
    from llamarpc.client.remote import RemoteBackend
    b = RemoteBackend(sys.argv[1], timeout=10)
    b.alloc_buffer(8 << 20)
    print("ready", flush=True)
    time.sleep(600)
""")


def test_session_freed_when_client_process_is_killed(plain_node, tmp_path):
    free0 = free_bytes(plain_node)
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    env = {"no_proxy": "*", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    client = subprocess.Popen([sys.executable, str(script), plain_node.address], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert client.stdout is not None and client.stdout.readline().strip() == "ready", client.stderr
        assert free_bytes(plain_node) == free0 - (8 << 20)
        client.kill()            # SIGKILL: no close(), no goodbye
        client.wait(10)
        wait_for(lambda: free_bytes(plain_node) == free0, what="the killed client's memory to come back")
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(10)
    assert plain_node.alive()


def test_session_cap_leaves_the_node_answering(plain_node):
    """Each session holds a server thread; past the cap a Hello is refused, other calls still answer."""
    with channel(plain_node.address) as ch:
        stub = pb_grpc.BackendStub(ch)
        streams = []
        try:
            for _ in range(64):
                s = stub.Hello(pb.HelloRequest(protocol_version=PROTOCOL_VERSION), timeout=60)
                try:
                    next(s)
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                    break
                streams.append(s)
            else:
                pytest.fail("64 sessions and no refusal")
            assert 4 <= len(streams) < 64, len(streams)
            t0 = time.monotonic()
            stub.GetMemory(pb.GetMemoryRequest(), timeout=5)
            assert time.monotonic() - t0 < 2
            streams.pop().cancel()    # one leaves: a newcomer gets in
            wait_for(lambda: _hello_ok(stub, streams), what="a session slot")
        finally:
            for s in streams:
                s.cancel()


def _hello_ok(stub: pb_grpc.BackendStub, streams: list) -> bool:
    s = stub.Hello(pb.HelloRequest(protocol_version=PROTOCOL_VERSION), timeout=60)
    try:
        next(s)
    except grpc.RpcError:
        return False
    streams.append(s)
    return True


def test_nodeproc_restart_keeps_the_port(tmp_path, stop_later):
    node = start_node(tmp_path, "--mem", "16")
    stop_later(node)
    port = node.port
    backend = RemoteBackend(node.address, timeout=5, connect_timeout=5)
    try:
        buf = backend.alloc_buffer(64)
        node.kill9()
        assert not node.alive()
        with pytest.raises(NodeUnavailable):
            backend.get_tensor(buf, 0, 8)
        node.restart()
        assert node.port == port and node.alive()
        # a new session on the new process (the old buffers are gone). gRPC shares subchannels
        # between channels, so the first attempts may still see the dead process's backoff.
        wait_for(lambda: _connects(backend), timeout=30, what="a session on the restarted node")
        matmul_roundtrip(backend)
    finally:
        backend.close()


def _connects(backend: RemoteBackend) -> bool:
    try:
        backend.connect()
    except NodeUnavailable:
        return False
    return True


# -- listening beyond loopback ----------------------------------------------------------------------
def test_warns_when_listening_beyond_loopback_without_token(tmp_path, stop_later):
    node = start_node(tmp_path, "--host", "0.0.0.0", "--mem", "16")   # readiness is checked via 127.0.0.1
    stop_later(node)
    node.stop()
    err = node.stderr_text()
    warning = [line for line in err.splitlines() if "WARNING" in line and "0.0.0.0" in line]
    assert warning, err
    assert "--auth-token-file" in warning[0] and "anyone who can reach this port" in warning[0]


def test_no_warning_on_loopback_or_with_token(tmp_path, stop_later):
    (tmp_path / "token").write_text(TOKEN)
    for args in ((), ("--host", "0.0.0.0", "--auth-token-file", str(tmp_path / "token"))):
        node = start_node(tmp_path, *args, "--mem", "16")
        stop_later(node)
        node.stop()
        assert "WARNING" not in node.stderr_text(), node.stderr_text()
