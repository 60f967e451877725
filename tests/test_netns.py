"""A node's network goes away mid-stream and comes back (issue 10), over a real link.

Each node runs in its own network namespace on its own address (10.231.N.2), reached from the
host through a veth pair (10.231.N.1 on the host side, a /30 of its own). Mid-stream the host side
of node 1's link is set down for a few seconds, then up: no RST, no FIN, the packets just stop,
so the frontend only learns of it from its keepalive pings going unanswered (set short here).
Every greedy stream completes and equals the undisturbed run; the engine shows the loss and the
recovery (the node re-attached, or its layers re-placed on node 0 when the grace ran out first).

Needs root and `ip netns` (skipped with the reason otherwise). Traffic only goes between the host
and the namespaces this test makes; everything made (nodes, namespaces, veths) is removed after.
"""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import threading
import time

import pytest
from llamarpc.client.remote import RemoteBackend
from llamarpc.frontend.engine import FinalEvent, PartialEvent
from nodeproc import start_node
from test_engine import Run, make_engine, prompts
from test_node_loss import N_PREDICT, _undisturbed, _wait_tokens

DOWN_S = 3.0          # the link's outage: longer than keepalive + its timeout, so it is noticed
KEEPALIVE = 2.0       # the least the nodes accept (client/remote.py MIN_KEEPALIVE)
KEEPALIVE_TIMEOUT = 1.0
GRACE = 5.0


@pytest.fixture(scope="module")
def synth_path(tmp_path_factory):
    from synth import write_model

    path = tmp_path_factory.mktemp("netns") / "m.gguf"
    write_model(path, n_layer=4, n_embd=128, n_head=4, n_head_kv=2, n_ff=256, seed=3)
    return path


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


class Netns:
    """One namespace `name` with veth `host_if` (host side, 10.231.R.4n+1/30) <-> 10.231.R.4n+2 inside."""

    def __init__(self, tag: str, subnet: int, n: int) -> None:
        self.name = f"llr-{tag}-{n}"
        self.host_if = f"llr{tag}{n}h"    # interface names: 15 characters at most
        self.peer_if = f"llr{tag}{n}n"
        self.host_addr = f"10.231.{subnet}.{4 * n + 1}"
        self.addr = f"10.231.{subnet}.{4 * n + 2}"
        self.made = False

    def create(self) -> None:
        _ip("netns", "add", self.name)
        self.made = True
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if)
        _ip("link", "set", self.peer_if, "netns", self.name)
        _ip("addr", "add", f"{self.host_addr}/30", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        _ip("-n", self.name, "addr", "add", f"{self.addr}/30", "dev", self.peer_if)
        _ip("-n", self.name, "link", "set", self.peer_if, "up")
        _ip("-n", self.name, "link", "set", "lo", "up")

    def link(self, state: str) -> None:
        _ip("link", "set", self.host_if, state)

    def remove(self) -> None:
        # deleting the namespace destroys its veth end, and the pair with it; the host end is
        # deleted too in case the pair was made but not yet moved into the namespace
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=10)
        if self.made:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)


def _skip_reason() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root to make network namespaces"
    if shutil.which("ip") is None:
        return "needs the `ip` command (iproute2)"
    probe = f"llr-probe-{secrets.token_hex(3)}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        return f"`ip netns add` is not permitted here: {r.stderr.strip() or r.returncode}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


def _free_subnet() -> int:
    """A 10.231.R.0/24 that no interface of the host uses (another run of this test, a real LAN)."""
    used = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=10).stdout
    free = [r for r in range(256) if f" 10.231.{r}." not in used]
    if not free:
        pytest.skip("no free 10.231.R.0/24 for the test's links")
    return free[secrets.randbelow(len(free))]


@pytest.fixture
def netns_nodes(tmp_path):
    """Two nodes, each in its own namespace on its own address; all removed afterwards."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    tag = secrets.token_hex(2)
    subnet = _free_subnet()
    spaces = [Netns(tag, subnet, n) for n in range(2)]
    nodes = []
    try:
        for ns in spaces:
            ns.create()
            nodes.append(start_node(tmp_path, host=ns.addr, wrap=("ip", "netns", "exec", ns.name)))
        yield list(zip(spaces, nodes))
    finally:
        for node in nodes:
            node.stop()
        for ns in spaces:
            ns.remove()


def test_link_down_mid_stream_then_up_streams_complete_equal(synth_path, netns_nodes):
    (_, node0), (ns1, node1) = netns_nodes
    ps = prompts(3)
    want = _undisturbed(synth_path, ps)
    backends = [RemoteBackend(n.address, keepalive=KEEPALIVE, keepalive_timeout=KEEPALIVE_TIMEOUT,
                              connect_timeout=2.0) for n in (node0, node1)]
    eng = make_engine(synth_path, backends=backends, n_parallel=len(ps), node_grace=GRACE, warmup=False)
    up = threading.Timer(DOWN_S, ns1.link, args=("up",))
    try:
        pipe = eng.model.pipeline
        assert {s.backend.name for s in pipe.stages} == {node0.address, node1.address}
        run = Run(eng)
        tasks = [run.submit(p, n_predict=N_PREDICT, ignore_eos=True, cache_prompt=False) for p in ps]
        _wait_tokens(run, tasks, 3)
        ns1.link("down")
        up.start()
        lost_seen = False
        end = time.time() + 60
        while not all(run.done[t.id].is_set() for t in tasks) and time.time() < end:
            lost_seen = lost_seen or any(n["state"] == "lost" for n in pipe.nodes())
            time.sleep(0.02)
        finals = [run.final(t, timeout=5) for t in tasks]
        up.join()
        assert all(isinstance(f, FinalEvent) for f in finals), finals
        assert [f.tokens for f in finals] == want
        for t, f in zip(tasks, finals):     # streamed once: no token repeated or lost across the pause
            assert [tok for e in run.events[t.id] if isinstance(e, PartialEvent) for tok in e.tokens] == f.tokens
        st = eng.recovery.stats
        assert st.n_node_losses >= 1 and st.n_reattached + st.n_replaced >= 1 and st.n_failed == 0, st
        assert st.n_streams_resumed >= len(ps) and st.n_replayed_tokens > 0, st
        assert lost_seen or st.n_replaced, "the lost node never showed in the engine's node states"
        states = {n["name"]: n["state"] for n in pipe.nodes()}
        if st.n_replaced:     # the grace ran out before the link was back: node 0 holds every layer
            assert states[node1.address] == "removed" and states[node0.address] == "attached"
        else:
            assert states == {node0.address: "attached", node1.address: "attached"}
        assert eng.health_error is None and not eng.recovery.active
    finally:
        up.cancel()
        ns1.link("up")
        eng.stop()
        eng.model.close()
