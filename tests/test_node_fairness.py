"""Sessions that live while idle, and a node shared fairly: the keepalive rules the node and
RemoteBackend agree on (an idle session lives, a frozen peer is noticed within seconds), the
per-client session and byte limits, and a dropped session seen by the client and re-opened by the
frontend without a failed request. Everything runs on 127.0.0.1 (and a Unix socket, for a second
client address); the keepalive intervals are shortened to 2 s so idling takes seconds, not minutes
(scripts/idle_check.py idles 100 s with the defaults)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import pytest
from llamarpc.client.remote import RemoteBackend
from llamarpc.proto import PROTOCOL_VERSION
from llamarpc.proto.errors import NodeUnavailable, ResourceExhausted
from llamarpc.rpcserver.node import Node
from llamarpc.rpcserver.servicer import SessionLimits, client_address, make_server
from nodeproc import start_node

MiB = 1 << 20
KEEPALIVE = 2.0


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """RemoteBackend's channels read the proxy variables: make sure nothing leaves 127.0.0.1."""
    for var in ("http_proxy", "https_proxy", "grpc_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")


def wait_for(predicate, timeout: float, what: str) -> float:
    """Seconds until `predicate()` holds; fails after `timeout`."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - t0


def roundtrip(backend: RemoteBackend, size: int = 4096) -> None:
    data = np.arange(size, dtype=np.uint8)
    buf = backend.alloc_buffer(size)
    backend.set_tensor(buf, 0, data)
    assert backend.get_tensor(buf, 0, size) == data.tobytes()
    backend.free_buffer(buf)


def sessions_opened(stderr: str) -> int:
    return sum(1 for line in stderr.splitlines() if " opened by " in line)


@pytest.fixture
def local_server():
    """An in-process node listening on 127.0.0.1 and on a Unix socket: two client addresses on
    one machine. Yields (node, tcp address, unix address, server)."""
    made = []
    tmp = tempfile.mkdtemp(prefix="lrpc")   # short: a socket path has ~100 bytes at most

    def make(limits: SessionLimits, capacity: int = 64 * MiB, keepalive: float = 10.0):
        node = Node("cpu", capacity=capacity)
        server, port, _ = make_server(node, "127.0.0.1:0", limits=limits, keepalive=keepalive)
        sock = os.path.join(tmp, f"n{len(made)}.sock")
        if server.add_insecure_port(f"unix:{sock}") == 0:
            pytest.skip("this gRPC cannot listen on a Unix socket")
        server.start()
        made.append(server)
        return node, f"127.0.0.1:{port}", f"unix:{sock}"

    yield make
    for s in made:
        s.stop(0)
    shutil.rmtree(tmp, ignore_errors=True)


# -- addresses and default shares -------------------------------------------------------------------
def test_client_address_and_default_shares():
    assert client_address("ipv4:10.1.2.3:5555") == ("10.1.2.3", False)
    assert client_address("ipv4:127.0.0.1:5555") == ("127.0.0.1", True)
    assert client_address("ipv6:[::1]:5555") == ("::1", True)
    assert client_address("ipv6:[2001:db8::7]:5555") == ("2001:db8::7", False)
    assert client_address("ipv6:[::ffff:10.1.2.3]:5555") == ("10.1.2.3", False)   # dual-stack listener
    assert client_address("ipv6:[fe80::1%25eth0]:5555") == ("fe80::1", False)
    assert client_address("unix:/run/x.sock") == ("unix", True)
    assert client_address("unix:") == ("unix", True)
    assert client_address("ipv4:garbage:1")[1] is False
    lim = SessionLimits()
    assert (lim.max_sessions, lim.sessions_per_client) == (16, 4)
    cap = 1000 * MiB
    # a fair share off loopback: half the node; no cap for this machine's clients unless asked
    assert lim.bytes_for("client_mem", cap, local=False) == cap // 2
    assert lim.bytes_for("session_mem", cap, local=False) == cap // 2
    assert lim.bytes_for("client_mem", cap, local=True) == 0
    explicit = SessionLimits(session_mem=16 * MiB, client_mem=0)
    assert explicit.bytes_for("session_mem", cap, local=True) == 16 * MiB
    assert explicit.bytes_for("client_mem", cap, local=False) == 0
    for bad in (dict(max_sessions=0), dict(max_sessions=5000), dict(sessions_per_client=0),
                dict(max_sessions=4, sessions_per_client=5), dict(session_mem=-1), dict(client_mem=-5)):
        with pytest.raises(ValueError):
            SessionLimits(**bad)
    with pytest.raises(ValueError, match="keepalive"):
        RemoteBackend("127.0.0.1:1", keepalive=0.5)


def test_a_network_client_gets_half_the_node_by_default():
    """Admission as the servicer does it for a peer off loopback (which a test cannot be)."""
    from llamarpc.rpcserver.memory import Quota
    from llamarpc.rpcserver.servicer import BackendServicer
    from llamarpc.rpcserver.tensor_cache import TensorCache

    node = Node("cpu", capacity=64 * MiB)
    servicer = BackendServicer(node, TensorCache(None), limits=SessionLimits())
    sids = []
    for _ in range(4):
        client, why = servicer._admit("10.1.2.3", local=False)
        assert client is not None and why == ""
        sid = node.hello(PROTOCOL_VERSION).session_id
        node.memory.set_quotas(sid, (Quota(32 * MiB, "this session (--session-mem)"), client.quota))
        sids.append(sid)
    refused, why = servicer._admit("10.1.2.3", local=False)
    assert refused is None and "--sessions-per-client" in why
    assert servicer._admit("10.9.9.9", local=False)[0] is not None   # another client gets in
    node.alloc_buffer(sids[0], 20 * MiB)
    node.alloc_buffer(sids[1], 12 * MiB)
    with pytest.raises(ResourceExhausted, match=r"client 10\.1\.2\.3 \(--client-mem\) may hold 33554432 bytes"):
        node.alloc_buffer(sids[2], 1)
    assert node.memory.free_for(sids[2]) == 0 and node.memory.free == 32 * MiB
    node.close_session(sids[0])
    node.alloc_buffer(sids[2], 20 * MiB)


# -- keepalive --------------------------------------------------------------------------------------
def test_idle_session_lives_through_keepalive_pings(tmp_path):
    """The client pings every 2 s with nothing else on the wire. A node on gRPC's defaults (pings
    without data at most every 5 minutes, 2 strikes) answered the third such ping with GOAWAY
    too_many_pings, which ended the session: a re-attach and a lost prompt cache for the frontend."""
    node = start_node(tmp_path, "--keepalive", str(KEEPALIVE))
    try:
        backend = RemoteBackend(node.address, keepalive=KEEPALIVE, keepalive_timeout=KEEPALIVE)
        session = backend._session
        roundtrip(backend)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 10.0:
            assert backend.alive, f"the session ended after {time.monotonic() - t0:.1f} s idle"
            time.sleep(0.25)
        roundtrip(backend)
        assert backend.alive and backend._session == session
        assert sessions_opened(node.stderr_text()) == 1
        backend.close()
    finally:
        node.stop()


def test_frozen_node_is_noticed_within_seconds(tmp_path):
    """SIGSTOP: the connection stays up (the kernel still acks TCP) but the node answers nothing;
    the client's unanswered ping ends the session within keepalive + timeout."""
    node = start_node(tmp_path, "--keepalive", str(KEEPALIVE))
    stopped = False
    try:
        backend = RemoteBackend(node.address, keepalive=KEEPALIVE, keepalive_timeout=KEEPALIVE, timeout=5)
        roundtrip(backend)
        time.sleep(5)   # data-less pings have gone back and forth
        assert backend.alive
        os.kill(node.pid, signal.SIGSTOP)
        stopped = True
        took = wait_for(lambda: not backend.alive, 3 * KEEPALIVE + 2, "the frozen node to be noticed")
        assert took <= 2 * KEEPALIVE + 1.5
        t0 = time.monotonic()
        with pytest.raises(NodeUnavailable):
            backend.alloc_buffer(64)
        assert time.monotonic() - t0 < 6
        os.kill(node.pid, signal.SIGCONT)
        stopped = False
        backend.reconnect()
        roundtrip(backend)
        backend.close()
    finally:
        if stopped:
            os.kill(node.pid, signal.SIGCONT)
        node.stop()


FROZEN_CLIENT = textwrap.dedent("""
    import sys, time
    from llamarpc.client.remote import RemoteBackend
    b = RemoteBackend(sys.argv[1], timeout=10)
    b.alloc_buffer(8 << 20)
    print("ready", flush=True)
    time.sleep(600)
""")


def test_frozen_client_is_dropped_and_its_memory_freed(local_server, tmp_path):
    node, tcp, _ = local_server(SessionLimits(), keepalive=1.0)
    script = tmp_path / "client.py"
    script.write_text(FROZEN_CLIENT)
    env = {"no_proxy": "*", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    client = subprocess.Popen([sys.executable, str(script), tcp], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env)
    try:
        assert client.stdout is not None and client.stdout.readline().strip() == "ready", client.stderr
        assert node.memory.used == 8 * MiB
        os.kill(client.pid, signal.SIGSTOP)   # alive to TCP, deaf to pings: no FIN, no RST
        wait_for(lambda: node.memory.used == 0, 10, "the frozen client's session to be dropped")
    finally:
        client.kill()
        client.wait(10)


# -- per-client limits ------------------------------------------------------------------------------
def test_sessions_per_client_address(local_server):
    node, tcp, unix = local_server(SessionLimits(max_sessions=4, sessions_per_client=2))
    a = [RemoteBackend(tcp), RemoteBackend(tcp)]
    with pytest.raises(ResourceExhausted, match=r"client 127\.0\.0\.1 has its maximum of 2 sessions open on this "
                                                r"node \(--sessions-per-client\)"):
        RemoteBackend(tcp)
    b = [RemoteBackend(unix), RemoteBackend(unix)]           # another client is not shut out
    for backend in a + b:
        roundtrip(backend)
    a[0].close()
    later = wait_for_backend(tcp)                           # a freed slot goes to whoever asks
    with pytest.raises(ResourceExhausted, match=r"maximum of 4 sessions open \(--max-sessions\)"):
        RemoteBackend(unix)
    for backend in (a[1], *b, later):
        backend.close()


def wait_for_backend(address: str) -> RemoteBackend:
    box: list[RemoteBackend] = []

    def attempt() -> bool:
        try:
            box.append(RemoteBackend(address))
        except ResourceExhausted:
            return False
        return True

    wait_for(attempt, 10, "a session slot")
    return box[0]


def test_default_sessions_per_client_on_a_node_process(tmp_path):
    node = start_node(tmp_path)
    try:
        held = [RemoteBackend(node.address) for _ in range(4)]
        with pytest.raises(ResourceExhausted, match="--sessions-per-client"):
            RemoteBackend(node.address)
        for backend in held:
            backend.close()
    finally:
        node.stop()


def test_byte_caps_per_session_and_per_client(local_server):
    node, tcp, unix = local_server(SessionLimits(max_sessions=8, sessions_per_client=4, session_mem=16 * MiB,
                                                 client_mem=24 * MiB))
    s1, s2 = RemoteBackend(tcp), RemoteBackend(tcp)
    s1.alloc_buffer(10 * MiB)
    with pytest.raises(ResourceExhausted, match=r"this session \(--session-mem\) may hold 16777216 bytes and holds "
                                                r"10485760"):
        s1.alloc_buffer(8 * MiB)
    assert s1.get_memory() == (6 * MiB, 64 * MiB)          # free as this session sees it, the node's total
    s2_buf = s2.alloc_buffer(14 * MiB)                     # 24 MiB for the client now
    with pytest.raises(ResourceExhausted, match=r"client 127\.0\.0\.1 \(--client-mem\) may hold 25165824 bytes"):
        s2.alloc_buffer(1)
    assert s2.get_memory()[0] == 0
    other = RemoteBackend(unix)                            # another client has its own share
    other.alloc_buffer(16 * MiB)
    assert node.memory.used == 40 * MiB
    s2.free_buffer(s2_buf)
    s2.alloc_buffer(MiB)
    s1.close()                                             # a closed session gives its bytes back
    wait_for(lambda: node.memory.used == 17 * MiB, 10, "the closed session's bytes")
    s2.alloc_buffer(10 * MiB)
    for b in (s2, other):
        b.close()
    wait_for(lambda: node.memory.used == 0, 10, "every session's bytes")


def test_session_mem_flag_on_a_node_process(tmp_path):
    node = start_node(tmp_path, "--mem", "64", "--session-mem", "16")
    try:
        backend = RemoteBackend(node.address)
        backend.alloc_buffer(16 * MiB)
        with pytest.raises(ResourceExhausted, match=r"--session-mem"):
            backend.alloc_buffer(1)
        other = RemoteBackend(node.address)
        other.alloc_buffer(16 * MiB)
        backend.close()
        other.close()
    finally:
        node.stop()
    bad = subprocess.run([sys.executable, "-m", "llamarpc.rpcserver.cli", "--port", "0", "--sessions-per-client",
                          "20", "--cache-dir", ""], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "no_proxy": "*"})
    assert bad.returncode == 2 and "sessions per client must be in 1..16" in bad.stderr


# -- a session the node dropped ---------------------------------------------------------------------
def test_a_dropped_session_is_seen_and_reopened(local_server):
    node, tcp, _ = local_server(SessionLimits())
    backend = RemoteBackend(tcp)
    buf = backend.alloc_buffer(4096)
    # the node drops the session (as a restart would) while the connection lives: the next call
    # says so as NodeUnavailable, never as a bare FAILED_PRECONDITION, and `alive` turns False
    node.close_session(backend._session)
    with pytest.raises(NodeUnavailable, match="session lost"):
        backend.get_tensor(buf, 0, 16)
    assert not backend.alive
    backend.reconnect()
    assert backend.alive
    roundtrip(backend)
    # with no call in flight the client learns it from the session stream, which the node ends
    node.close_session(backend._session)
    wait_for(lambda: not backend.alive, 5, "the client to see its session end")
    backend.reconnect()
    roundtrip(backend)
    # an answer about an older session changes nothing
    old = backend._session
    backend.reconnect()
    node.close_session(old)
    time.sleep(0.2)
    assert backend.alive
    backend.close()


# -- the frontend -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_frontend_lives_through_idle_and_node_restarts_without_a_failed_request(model_path, tmp_path, monkeypatch):
    import httpx
    from serverproc import start_server

    monkeypatch.setenv("LLAMARPC_RPC_KEEPALIVE", str(KEEPALIVE))
    monkeypatch.setenv("LLAMARPC_RPC_KEEPALIVE_TIMEOUT", str(KEEPALIVE))
    nodes = [start_node(tmp_path, "--keepalive", str(KEEPALIVE)) for _ in range(2)]
    srv = None
    try:
        srv, url = start_server(["-m", str(model_path), "--rpc", ",".join(n.address for n in nodes), "-c", "512",
                                 "-np", "1", "-t", "1"])
        body = {"prompt": "The capital of France is", "n_predict": 8, "temperature": 0}

        def complete() -> str:
            r = httpx.post(f"{url}/completion", json=body, timeout=120)
            assert r.status_code == 200, r.text
            return r.json()["content"]

        want = complete()
        assert want
        time.sleep(8)                                   # 4 keepalive rounds with nothing else on the wire
        assert complete() == want
        assert [sessions_opened(n.stderr_text()) for n in nodes] == [1, 1], "a node session was re-opened"

        nodes[1].restart()                              # SIGTERM, a new process on the same port
        assert complete() == want
        nodes[0].kill9()                                # no goodbye at all
        nodes[0].restart()
        assert complete() == want
        assert [sessions_opened(n.stderr_text()) for n in nodes] == [2, 2]
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    finally:
        if srv is not None:
            srv.stop()
        for n in nodes:
            n.stop()
