"""Lose a node, lose no request (issue 10): streams pause while a node is lost, the KV cache is
rebuilt by replaying the slots' tokens, and every stream continues with the text an undisturbed
run gives (greedy), whether the node comes back within the grace period (re-attached) or not
(its layers re-placed on the nodes left). Only when the layers fit nowhere do streams end (503).

In process (FlakyBackend: an unpluggable LocalBackend) and over real node processes (kill -9)."""
from __future__ import annotations

import threading
import time

import pytest
from llamarpc.client.local import LocalBackend
from llamarpc.client.remote import RemoteBackend
from llamarpc.frontend.engine import ErrorEvent, FinalEvent, PartialEvent
from nodeproc import start_node
from test_engine import FlakyBackend, Run, make_engine, prompts


@pytest.fixture(scope="module")
def synth_path(tmp_path_factory):
    from synth import write_model

    path = tmp_path_factory.mktemp("loss") / "m.gguf"
    write_model(path, n_layer=4, n_embd=128, n_head=4, n_head_kv=2, n_ff=256, seed=3)
    return path


N_PREDICT = 60


def _undisturbed(path, ps: list[list[int]]) -> list[list[int]]:
    ref = make_engine(path, n_parallel=len(ps), warmup=False)
    try:
        run = Run(ref)
        tasks = [run.submit(p, n_predict=N_PREDICT, ignore_eos=True, cache_prompt=False) for p in ps]
        return [run.final(t).tokens for t in tasks]
    finally:
        ref.stop()
        ref.model.close()


def _wait_tokens(run: Run, tasks, n: int, timeout: float = 30.0) -> None:
    end = time.time() + timeout
    while any(sum(isinstance(e, PartialEvent) for e in run.events[t.id]) < n for t in tasks):
        assert time.time() < end, "streams did not start"
        time.sleep(0.002)


def test_node_back_within_grace_streams_continue_equal(synth_path):
    ps = prompts(3)
    want = _undisturbed(synth_path, ps)
    flaky = FlakyBackend()
    eng = make_engine(synth_path, backends=[LocalBackend(), flaky], n_parallel=3, node_grace=30.0)
    try:
        run = Run(eng)
        tasks = [run.submit(p, n_predict=N_PREDICT, ignore_eos=True, cache_prompt=False) for p in ps]
        _wait_tokens(run, tasks, 5)
        flaky.down = flaky.restarted = True          # gone, and its session (KV cache) with it
        time.sleep(0.5)
        assert eng.recovery.active and "flaky:1" in (eng.health_error or "")
        assert [n["state"] for n in eng.model.pipeline.nodes()] == ["attached", "lost"]
        flaky.down = False                           # back within the grace period
        finals = [run.final(t) for t in tasks]
        assert all(isinstance(f, FinalEvent) for f in finals), finals
        assert [f.tokens for f in finals] == want
        # the streamed pieces are the text, once: no token repeated or lost across the pause
        for t, f in zip(tasks, finals):
            assert [tok for e in run.events[t.id] if isinstance(e, PartialEvent) for tok in e.tokens] == f.tokens
        st = eng.recovery.stats
        assert (st.n_node_losses, st.n_reattached, st.n_replaced, st.n_streams_resumed) == (1, 1, 0, 3)
        assert st.n_replayed_tokens >= sum(len(p) + 4 for p in ps)    # the last token sampled is not cached yet
        assert eng.health_error is None and not eng.recovery.active
    finally:
        eng.stop()
        eng.model.close()


def test_node_gone_for_good_layers_replaced(synth_path):
    ps = prompts(2)
    want = _undisturbed(synth_path, ps)
    flaky = FlakyBackend()
    eng = make_engine(synth_path, backends=[LocalBackend(), flaky, LocalBackend()], n_parallel=2, node_grace=0.3)
    try:
        pipe = eng.model.pipeline
        lost_layers = next(s.layers for s in pipe.stages if s.backend is flaky)
        run = Run(eng)
        tasks = [run.submit(p, n_predict=N_PREDICT, ignore_eos=True, cache_prompt=False) for p in ps]
        _wait_tokens(run, tasks, 5)
        flaky.down = True                            # never back
        finals = [run.final(t) for t in tasks]
        assert all(isinstance(f, FinalEvent) for f in finals), finals
        assert [f.tokens for f in finals] == want
        assert all(s.backend is not flaky for s in pipe.stages)
        assert [i for s in pipe.stages for i in s.layers] == list(range(4))
        assert pipe.replacements[0]["from"] == "flaky:1"
        assert pipe.replacements[0]["layers"] == f"{lost_layers.start}-{lost_layers.stop - 1}"
        assert [n["state"] for n in pipe.nodes()] == ["attached", "attached", "removed"]
        assert eng.recovery.stats.n_replaced == 1 and eng.health_error is None
        # and it keeps serving on the nodes left
        again = Run(eng)
        f = again.final(again.submit(ps[0], n_predict=N_PREDICT, ignore_eos=True, cache_prompt=False))
        assert isinstance(f, FinalEvent) and f.tokens == want[0]
    finally:
        eng.stop()
        eng.model.close()


def test_layers_fit_nowhere_streams_end_then_service_comes_back(synth_path):
    flaky = FlakyBackend()
    eng = make_engine(synth_path, backends=[flaky], n_parallel=2, node_grace=0.3)
    try:
        run = Run(eng)
        t = run.submit(prompts(1)[0], n_predict=300, ignore_eos=True)
        _wait_tokens(run, [t], 1)
        flaky.down = True
        err = run.final(t)
        assert isinstance(err, ErrorEvent) and err.code == 503 and "flaky:1" in err.message
        assert "no node is left" in err.message
        assert eng.recovery.stats.n_streams_failed == 1
        err2 = run.final(run.submit(prompts(1)[0], n_predict=3))      # fails fast while down
        assert isinstance(err2, ErrorEvent) and err2.code == 503
        flaky.down = False
        deadline = time.time() + 10
        while eng.health_error is not None and time.time() < deadline:
            time.sleep(0.05)
        ok = run.final(run.submit(prompts(2)[1], n_predict=8, ignore_eos=True))
        assert isinstance(ok, FinalEvent)
    finally:
        eng.stop()
        eng.model.close()


# -- real node processes ---------------------------------------------------------------------------
def _remote_engine(path, nodes, n_parallel: int, grace: float):
    return make_engine(path, backends=[RemoteBackend(n.address) for n in nodes], n_parallel=n_parallel,
                       node_grace=grace, warmup=False)


def kill9_and_restart(path, nodes, ps, want, delay: float = 2.0) -> list:
    """One round: streams start, node 1 is killed -9 and restarted `delay` s later; the finals."""
    eng = _remote_engine(path, nodes, len(ps), grace=60.0)
    try:
        run = Run(eng)
        tasks = [run.submit(p, n_predict=N_PREDICT, ignore_eos=True, cache_prompt=False) for p in ps]
        _wait_tokens(run, tasks, 3)
        nodes[1].kill9()
        restart = threading.Timer(delay, nodes[1].restart)
        restart.start()
        finals = [run.final(t, timeout=90) for t in tasks]
        restart.join()
        assert eng.recovery.stats.n_reattached == 1, eng.recovery.stats
        return finals
    finally:
        eng.stop()
        eng.model.close()


def test_kill9_node_mid_stream_restarted_streams_complete_equal(synth_path, tmp_path):
    ps = prompts(3)
    want = _undisturbed(synth_path, ps)
    nodes = [start_node(tmp_path), start_node(tmp_path)]
    try:
        finals = kill9_and_restart(synth_path, nodes, ps, want)
        assert all(isinstance(f, FinalEvent) for f in finals), finals
        assert [f.tokens for f in finals] == want
    finally:
        for n in nodes:
            n.stop()


def test_three_nodes_one_killed_for_good_layers_replaced_equal(synth_path, tmp_path):
    ps = prompts(2)
    want = _undisturbed(synth_path, ps)
    nodes = [start_node(tmp_path) for _ in range(3)]
    eng = _remote_engine(synth_path, nodes, len(ps), grace=0.5)
    try:
        run = Run(eng)
        tasks = [run.submit(p, n_predict=N_PREDICT, ignore_eos=True, cache_prompt=False) for p in ps]
        _wait_tokens(run, tasks, 3)
        nodes[1].kill9()
        finals = [run.final(t, timeout=60) for t in tasks]
        assert all(isinstance(f, FinalEvent) for f in finals), finals
        assert [f.tokens for f in finals] == want
        pipe = eng.model.pipeline
        assert {s.backend.name for s in pipe.stages} == {nodes[0].address, nodes[2].address}
        assert [i for s in pipe.stages for i in s.layers] == list(range(4))
        states = {n["name"]: n["state"] for n in pipe.nodes()}
        assert states == {nodes[0].address: "attached", nodes[2].address: "attached", nodes[1].address: "removed"}
        assert eng.recovery.stats.n_replaced == 1
    finally:
        eng.stop()
        eng.model.close()
        for n in nodes:
            n.stop()
