"""Slots on disk and context shift over real llamarpc-server processes (gRPC on 127.0.0.1), on a
synthetic model: a slot saved in process restores onto two nodes (GetTensor/SetTensor over the
wire), the nodes turn their K caches (ROPE_SHIFT) with the same tokens as in process, and a bad
ROPE_SHIFT is INVALID_ARGUMENT with a message."""
from __future__ import annotations

import numpy as np
import pytest
from llamarpc.client import GraphBuilder, TensorRef
from llamarpc.client.local import LocalBackend
from llamarpc.client.remote import RemoteBackend
from llamarpc.frontend.engine import Engine, EngineConfig, FinalEvent, TaskParams, load_model, slot_file
from llamarpc.frontend.sampling import SamplingParams
from llamarpc.proto import pb
from llamarpc.proto.errors import InvalidArgument
from llamarpc.proto.types import GGMLType as T
from nodeproc import start_node
from synth import write_model

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slotnodes")
    write_model(tmp / "m.gguf", n_layer=4, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, seed=11)
    nodes = [start_node(tmp), start_node(tmp)]
    yield tmp, nodes
    for n in nodes:
        n.stop()


def _engine(path, backends, split=None, shift=False) -> Engine:
    model = load_model(str(path), backends, n_ctx=96, tensor_split=split)
    eng = Engine(model, EngineConfig(n_parallel=1, warmup=False, context_shift=shift))
    eng.start()
    return eng


def _run(eng, prompt, n, **kw) -> FinalEvent:
    last = list(eng.stream(prompt, TaskParams(sampling=GREEDY, n_predict=n, ignore_eos=True, **kw)))[-1]
    assert isinstance(last, FinalEvent), last
    return last


def test_save_local_restore_on_two_nodes_and_shift(setup):
    tmp, nodes = setup
    local = _engine(tmp / "m.gguf", [LocalBackend()], shift=True)
    remote = _engine(tmp / "m.gguf", [RemoteBackend(n.address) for n in nodes], split=[1, 1], shift=True)
    try:
        prompt = list(range(20, 50))
        _run(local, prompt, 5)
        slot_file.save(local, 0, str(tmp), "s.bin")
        res = slot_file.restore(remote, 0, str(tmp), "s.bin")
        assert res["n_restored"] == len(prompt) + 4
        assert remote.call(lambda e: slot_file.read_slot(e, 0)).result() == (tmp / "s.bin").read_bytes()
        more = local.slots[0].cache + [7, 8]
        # past the 96-token slot: both shift (in process and on the nodes) and agree
        a = _run(local, more, 120, n_keep=8)
        b = _run(remote, more, 120, n_keep=8)
        assert b.timings.cache_n == len(more) - 2 and a.truncated and b.truncated
        assert a.n_decoded == b.n_decoded == 120
        assert a.tokens == b.tokens
    finally:
        for e in (local, remote):
            e.stop()
            e.model.close()


def test_bad_rope_shift_is_invalid_argument_over_grpc(setup):
    _, nodes = setup
    b = RemoteBackend(nodes[0].address)
    try:
        buf = b.alloc_buffer(8 * 32 * 4)
        gb = GraphBuilder()

        cells = gb.input("cells", T.I32, ("n",))
        delta = gb.input("delta", T.I32, ("n",))
        k = gb.tensor(TensorRef(buf, 0, T.F32, (8, 32)))
        gb.output("cells", gb.op(pb.ROPE_SHIFT, k, cells, delta, head_dim=16, n_dims=16, rope_mode=0,
                                 freq_base=10000.0, freq_scale=1.0))
        gid = b.register_graph(gb.build())
        with pytest.raises(InvalidArgument, match="cells must be in"):
            b.compute(gid, {"cells": np.array([8], np.int32), "delta": np.array([1], np.int32)})
        with pytest.raises(InvalidArgument, match="delta"):
            b.compute(gid, {"cells": np.array([1], np.int32), "delta": np.array([1 << 30], np.int32)})
        with pytest.raises(InvalidArgument, match="distinct"):
            b.compute(gid, {"cells": np.array([1, 1], np.int32), "delta": np.array([1, 1], np.int32)})
        out = b.compute(gid, {"cells": np.array([1, 2], np.int32), "delta": np.array([1, -1], np.int32)})
        assert out["cells"].tolist() == [1, 2]
    finally:
        b.close()
