"""The model split over real llamarpc-server processes on 127.0.0.1: same logits as in process,
the weight cache, losing and re-attaching a node, placement by capacity."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from conftest import FIXTURES, greedy
from llamarpc.client.local import LocalBackend
from llamarpc.client.remote import RemoteBackend
from llamarpc.frontend.engine import Engine, EngineConfig, FinalEvent, LogitsProbe, TaskParams, load_model
from llamarpc.frontend.engine.placement import PlacementError
from llamarpc.frontend.sampling import SamplingParams
from llamarpc.proto.errors import NodeUnavailable
from nodeproc import start_node
from threadpoolctl import threadpool_limits

REF = json.loads((FIXTURES / "smollm2_ref.json").read_text())
REF_LOGITS = np.load(FIXTURES / "smollm2_ref_logits.npy")
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nodes")
    nodes = [start_node(tmp), start_node(tmp)]
    yield nodes
    for n in nodes:
        n.stop()


def _load(model_path, nodes, split=None):
    return load_model(str(model_path), [RemoteBackend(n.address) for n in nodes], n_ctx=512, tensor_split=split)


@pytest.mark.parametrize("n_nodes,split", [(1, None), (2, [3, 1])])
def test_split_model_is_bitwise_equal_to_local(model_path, two_nodes, n_nodes, split):
    # the nodes run one BLAS thread; so does the in-process node here (threads change sgemm's sums)
    limits = threadpool_limits(1)
    local = load_model(str(model_path), [LocalBackend()], n_ctx=512)
    remote = _load(model_path, two_nodes[:n_nodes], split)
    try:
        assert len(remote.pipeline.stages) == n_nodes
        for i, p in enumerate(REF["prompts"][:3]):
            a = LogitsProbe(local).eval(p["ids"])
            b = LogitsProbe(remote).eval(p["ids"])
            assert np.array_equal(a, b), p["name"]
            assert np.abs(b - REF_LOGITS[i]).max() <= 1e-3
        p = REF["prompts"][1]
        assert greedy(remote, p["ids"], 32) == p["greedy_ids"]
    finally:
        limits.restore_original_limits()
        local.close()
        remote.close()


def test_second_start_sends_no_weight_bytes(model_path, tmp_path):
    nodes = [start_node(tmp_path), start_node(tmp_path)]
    try:
        cold = _load(model_path, nodes)
        total = sum(s.weight_bytes for s in cold.pipeline.stages)
        assert cold.pipeline.bytes_sent >= 0.9 * total > 0
        cold.close()
        warm = _load(model_path, nodes)
        assert warm.pipeline.bytes_sent == 0
        p = REF["prompts"][0]
        assert np.abs(LogitsProbe(warm).eval(p["ids"]) - REF_LOGITS[0]).max() <= 1e-3
        warm.close()
        # the cache is on disk: it survives a node restart
        nodes[1].restart()
        again = _load(model_path, nodes)
        assert again.pipeline.bytes_sent == 0
        again.close()
    finally:
        for n in nodes:
            n.stop()


def test_kill9_node_between_generations_then_reattach(model_path, tmp_path):
    nodes = [start_node(tmp_path), start_node(tmp_path)]
    model = _load(model_path, nodes)
    engine = Engine(model, EngineConfig(warmup=False, node_grace=120.0))
    engine.start()
    try:
        ids = REF["prompts"][0]["ids"]
        params = TaskParams(sampling=GREEDY, n_predict=12, ignore_eos=True)
        first = list(engine.stream(ids, params))[-1]
        assert isinstance(first, FinalEvent) and len(first.tokens) == 12
        nodes[1].kill9()
        sent = model.pipeline.bytes_sent
        back = threading.Timer(1.0, nodes[1].restart)    # the request waits for it (tests/test_node_loss.py)
        back.start()
        again = list(engine.stream(ids, params))[-1]
        back.join()
        assert isinstance(again, FinalEvent) and again.tokens == first.tokens
        assert engine.recovery.stats.n_reattached == 1
        assert model.pipeline.bytes_sent == sent  # weights came back from the node's cache
    finally:
        engine.stop()
        model.close()
        for n in nodes:
            n.stop()


def test_model_larger_than_one_node_is_split(model_path, tmp_path):
    # each node offers 80 MiB: the model needs more than that (94 MB of weights in their blocks + KV)
    nodes = [start_node(tmp_path, "--mem", "80"), start_node(tmp_path, "--mem", "80")]
    try:
        with pytest.raises(PlacementError, match="short by"):
            _load(model_path, nodes[:1])
        model = _load(model_path, nodes)
        assert [len(s.layers) > 0 for s in model.pipeline.stages] == [True, True]
        p = REF["prompts"][0]
        assert np.abs(LogitsProbe(model).eval(p["ids"]) - REF_LOGITS[0]).max() <= 1e-3
        model.close()
    finally:
        for n in nodes:
            n.stop()


def test_unreachable_node_is_a_typed_error_naming_it(tmp_path):
    node = start_node(tmp_path)
    addr = node.address
    node.stop()
    with pytest.raises(NodeUnavailable) as e:
        RemoteBackend(addr, connect_timeout=3)
    assert addr in str(e.value)


def test_protocol_version_checked_both_ways(tmp_path, monkeypatch):
    import llamarpc.client.remote as remote
    from llamarpc.proto.errors import FailedPrecondition

    node = start_node(tmp_path)
    try:
        # the node refuses a client speaking another version ...
        monkeypatch.setattr(remote, "PROTOCOL_VERSION", 99)
        with pytest.raises(FailedPrecondition, match="client speaks 99, node speaks 1"):
            RemoteBackend(node.address)
    finally:
        node.stop()


def test_client_refuses_a_node_of_another_version():
    from llamarpc.proto import pb
    from llamarpc.proto.errors import FailedPrecondition
    from llamarpc.rpcserver.node import Node
    from llamarpc.rpcserver.servicer import make_server

    class OldNode(Node):
        def hello(self, protocol_version: int, client_name: str = "") -> pb.HelloReply:
            reply = super().hello(protocol_version, client_name)
            reply.protocol_version = 0
            return reply

    server, port, _ = make_server(OldNode("cpu", capacity=1 << 20), "127.0.0.1:0")
    server.start()
    try:
        with pytest.raises(FailedPrecondition, match="node speaks 0, client speaks 1"):
            RemoteBackend(f"127.0.0.1:{port}")
    finally:
        server.stop(0)


def test_micro_batches_flow_through_the_nodes_with_the_same_result(model_path, two_nodes):
    model = _load(model_path, two_nodes, [1, 1])
    try:
        ids = REF["prompts"][3]["ids"]             # 276 tokens: cut into micro-batches
        assert model.pipeline.micro_batches(len(ids)) == 4
        g = LogitsProbe(model, n_batch=512)
        piped = g.eval(ids, all_logits=True)
        model.pipeline.pipelined = False
        plain = LogitsProbe(model, n_batch=512).eval(ids, all_logits=True)
        assert np.abs(piped - plain).max() <= 1e-4
        assert np.abs(piped[-1] - REF_LOGITS[3]).max() <= 1e-3
        model.pipeline.pipelined = True
        # out_rows picked across micro-batches, in any order
        g2 = LogitsProbe(model, n_batch=512)
        g2.reset()
        n = len(ids)
        pos = np.arange(n, dtype=np.int32)
        seq = np.zeros(n, np.int32)
        cells = g2.kv.alloc(seq, pos)
        kv_pos, kv_seq = g2.kv.view()
        rows = np.array([275, 3, 140, 70], np.int32)
        out = model.pipeline.forward(np.asarray(ids, np.int32), pos, seq, cells, kv_pos, kv_seq, rows)
        assert np.abs(out - plain[rows]).max() <= 1e-4
    finally:
        model.close()
