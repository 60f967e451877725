"""The node refuses every bad field with a typed error and keeps serving."""
from __future__ import annotations

import numpy as np
import pytest
from llamarpc.client import GraphBuilder, TensorRef
from llamarpc.client.local import LocalBackend
from llamarpc.proto import pb
from llamarpc.proto.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from llamarpc.proto.types import GGMLType as T
from llamarpc.rpcserver.node import Node


@pytest.fixture
def backend():
    b = LocalBackend(capacity=1 << 20)
    yield b
    b.close()


def small_graph(buf: int, shape=(4, 8), offset=0):
    gb = GraphBuilder()
    x = gb.input("x", T.F32, ("n", 8))
    w = gb.tensor(TensorRef(buf, offset, T.F32, shape))
    gb.output("y", gb.matmul(x, w))
    return gb.build()


def test_compute_roundtrip(backend):
    buf = backend.alloc_buffer(1024)
    w = np.arange(32, dtype=np.float32).reshape(4, 8)
    backend.set_tensor(buf, 0, w)
    assert backend.get_tensor(buf, 0, 128) == w.tobytes()
    gid = backend.register_graph(small_graph(buf))
    x = np.ones((3, 8), np.float32)
    np.testing.assert_allclose(backend.compute(gid, {"x": x})["y"], x @ w.T)
    # a write to the buffer is seen by the next compute (no stale weight copy)
    backend.set_tensor(buf, 0, w * 2)
    np.testing.assert_allclose(backend.compute(gid, {"x": x})["y"], x @ (2 * w).T)


def test_buffer_bounds_and_capacity(backend):
    buf = backend.alloc_buffer(64)
    with pytest.raises(InvalidArgument, match="outside buffer"):
        backend.set_tensor(buf, 60, b"\0" * 8)
    with pytest.raises(InvalidArgument, match="outside buffer"):
        backend.get_tensor(buf, 2**63, 8)
    with pytest.raises(InvalidArgument, match="outside buffer"):
        backend.copy_tensor(buf, 0, buf, 32, 64)
    with pytest.raises(NotFound):
        backend.get_tensor(buf + 100, 0, 1)
    with pytest.raises(ResourceExhausted):
        backend.alloc_buffer(1 << 21)
    with pytest.raises(InvalidArgument):
        backend.alloc_buffer(0)
    with pytest.raises(InvalidArgument):
        backend.clear_buffer(buf, 256)


def test_sessions_are_isolated():
    node = Node("cpu", capacity=1 << 20)
    a, b = LocalBackend(node=node), LocalBackend(node=node)
    buf = a.alloc_buffer(64)
    with pytest.raises(NotFound):
        b.get_tensor(buf, 0, 8)
    with pytest.raises(NotFound):
        b.register_graph(small_graph(buf, (1, 8)))
    used = node.memory.used
    a.close()  # closing frees the session's buffers
    assert node.memory.used == used - 64


@pytest.mark.parametrize("mutate,match", [
    (lambda g: g.tensors[0].__setattr__("offset", 1 << 40), "outside buffer"),
    (lambda g: g.tensors[0].__setattr__("offset", 4), "not a multiple"),
    (lambda g: g.tensors[0].__setattr__("type", 99), "unknown tensor type"),
    (lambda g: g.tensors[0].__setattr__("type", int(T.Q4_0)), "block size"),
    (lambda g: g.tensors[0].shape.__setitem__(0, 0), "positive"),
    (lambda g: g.tensors[0].shape.__setitem__(0, -3), "positive"),
    (lambda g: g.tensors[0].shape.extend([2, 2, 2, 2]), "1 to 4"),
    (lambda g: g.tensors[0].__setattr__("buffer_id", 12345), "no buffer"),
    (lambda g: g.ops[0].__setattr__("type", 77), "unknown op"),
    (lambda g: g.ops[0].args.append(0), "takes 2 arguments"),
    (lambda g: g.ops[0].args.__setitem__(0, 2), "earlier value"),
    (lambda g: g.outputs[0].__setattr__("value", 9), "unknown value"),
    (lambda g: g.inputs[0].__setattr__("type", int(T.Q8_0)), "F32 or I32"),
    (lambda g: g.inputs[0].shape.add(), "neither size nor symbol"),
    (lambda g: g.ops.add(type=pb.RMS_NORM, args=[0], attrs=pb.Attrs(eps=float("nan"))), "finite"),
    (lambda g: g.ops.add(type=pb.ROPE, args=[0, 0], attrs=pb.Attrs(head_dim=8, n_dims=9)), "rope"),
    (lambda g: g.ops.add(type=pb.ATTENTION, args=[0, 0, 0, 1, 1, 0, 0, 0, 0, 0],
                         attrs=pb.Attrs(head_dim=8, n_head=3, n_head_kv=2, scale=1)), "multiple of n_head_kv"),
    (lambda g: g.ops.add(type=pb.ATTENTION, args=[0, 0, 0, 1, 1, 0, 0, 0, 0, 0],
                         attrs=pb.Attrs(head_dim=8, n_head=2, n_head_kv=2, scale=1, sliding_window=4, non_causal=True)),
     "non_causal attention cannot have a sliding window"),
    (lambda g: g.ops.add(type=pb.SILU, args=[0], attrs=pb.Attrs(non_causal=True)), "non_causal is an attention"),
])
def test_bad_graphs_are_invalid_argument(backend, mutate, match):
    buf = backend.alloc_buffer(1024)
    g = small_graph(buf)
    mutate(g)
    with pytest.raises((InvalidArgument, NotFound), match=match):
        backend.register_graph(g)
    # and the node still works
    gid = backend.register_graph(small_graph(buf))
    assert backend.compute(gid, {"x": np.zeros((1, 8), np.float32)})["y"].shape == (1, 4)


def test_bad_compute_inputs(backend):
    buf = backend.alloc_buffer(1024)
    gid = backend.register_graph(small_graph(buf))
    for inputs, match in [({}, "missing input"), ({"x": np.zeros((2, 7), np.float32)}, "expected shape"),
                          ({"x": np.zeros((2, 8), np.int32)}, "expected F32"),
                          ({"x": np.zeros((2, 8), np.float32), "z": np.zeros(1, np.float32)}, "unknown inputs")]:
        with pytest.raises(InvalidArgument, match=match):
            backend.compute(gid, inputs)
    with pytest.raises(NotFound):
        backend.compute(gid + 1000, {"x": np.zeros((2, 8), np.float32)})


def test_graph_over_freed_buffer_fails(backend):
    buf = backend.alloc_buffer(1024)
    gid = backend.register_graph(small_graph(buf))
    backend.free_buffer(buf)
    with pytest.raises(FailedPrecondition, match="freed"):
        backend.compute(gid, {"x": np.zeros((1, 8), np.float32)})


def test_symbols_bind_consistently(backend):
    gb = GraphBuilder()
    a = gb.input("a", T.F32, ("n", 4))
    b = gb.input("b", T.F32, ("n", 4))
    gb.output("s", gb.add(a, b))
    gid = backend.register_graph(gb.build())
    with pytest.raises(InvalidArgument, match="symbol n"):
        backend.compute(gid, {"a": np.zeros((2, 4), np.float32), "b": np.zeros((3, 4), np.float32)})
    out = backend.compute(gid, {"a": np.ones((3, 4), np.float32), "b": np.ones((3, 4), np.float32)})
    np.testing.assert_array_equal(out["s"], np.full((3, 4), 2, np.float32))


def test_runtime_shape_errors_are_invalid_argument(backend):
    gb = GraphBuilder()
    a = gb.input("a", T.F32, ("n", "k"))
    b = gb.input("b", T.F32, ("m", "j"))
    gb.output("s", gb.add(a, b))
    gid = backend.register_graph(gb.build())
    with pytest.raises(InvalidArgument, match="do not broadcast"):
        backend.compute(gid, {"a": np.zeros((2, 4), np.float32), "b": np.zeros((3, 5), np.float32)})


def test_matmul_by_a_stored_tensor_with_no_block_kernel(backend):
    """A stored I32 matrix as a MATMUL weight has no block kernel: the plain path computes it (the
    fuzzer found it reaching the quantized dispatch and failing as UNKNOWN), fused (two matmuls of
    one activation) and alone."""
    buf = backend.alloc_buffer(1024)
    w = np.arange(32, dtype=np.int32).reshape(4, 8)
    backend.set_tensor(buf, 0, w)
    gb = GraphBuilder()
    x = gb.input("x", T.F32, ("n", 8))
    wi = gb.tensor(TensorRef(buf, 0, T.I32, (4, 8)))
    gb.output("y", gb.matmul(x, wi))
    gb.output("z", gb.matmul(x, wi))
    gid = backend.register_graph(gb.build())
    x = np.ones((2, 8), np.float32)
    out = backend.compute(gid, {"x": x})
    np.testing.assert_allclose(out["y"], x @ w.T.astype(np.float32))
    np.testing.assert_allclose(out["z"], out["y"])
    gid = backend.register_graph(_one_matmul_i32(buf))
    np.testing.assert_allclose(backend.compute(gid, {"x": x})["y"], x @ w.T.astype(np.float32))


def _one_matmul_i32(buf: int) -> pb.Graph:
    gb = GraphBuilder()
    x = gb.input("x", T.F32, ("n", 8))
    gb.output("y", gb.matmul(x, gb.tensor(TensorRef(buf, 0, T.I32, (4, 8)))))
    return gb.build()


def test_protocol_version_mismatch():
    with pytest.raises(FailedPrecondition, match="client speaks 99, node speaks 1"):
        Node("cpu", capacity=1 << 20).hello(99)


def test_tensor_cache_roundtrip_corruption_and_eviction(tmp_path):
    import hashlib

    from llamarpc.rpcserver.tensor_cache import TensorCache

    c = TensorCache(tmp_path, max_total=250)
    blobs = [bytes([i]) * 100 for i in range(3)]
    digests = [hashlib.sha256(b).digest() for b in blobs]
    c.put(digests[0], blobs[0])
    assert c.get(digests[0], 100) == blobs[0]
    assert c.get(digests[0], 99) is None                      # size must match too
    assert TensorCache(tmp_path).get(digests[0], 100) == blobs[0]   # survives a restart
    (tmp_path / digests[0].hex()).write_bytes(b"\x09" * 100)  # corrupted on disk: a miss, dropped
    assert c.get(digests[0], 100) is None and not (tmp_path / digests[0].hex()).exists()
    for d, b in zip(digests, blobs):
        c.put(d, b)
    assert sum(f.stat().st_size for f in tmp_path.iterdir()) <= 250   # bounded: the oldest went
    assert c.get(digests[2], 100) == blobs[2]


def test_weights_stay_in_their_blocks():
    """A quantized weight costs its stored bytes and nothing more, before and after it is used."""
    node = Node("cpu", capacity=1 << 24)
    b = LocalBackend(node=node)
    from gguf.quants import quantize

    buf = b.alloc_buffer(4096)
    w = quantize(np.ones((8, 64), np.float32), T.Q8_0)
    b.set_tensor(buf, 0, w)
    gb = GraphBuilder()
    x = gb.input("x", T.F32, ("n", 64))
    gb.output("y", gb.matmul(x, gb.tensor(TensorRef(buf, 0, T.Q8_0, (8, 64)))))
    gid = b.register_graph(gb.build())
    y = b.compute(gid, {"x": np.ones((3, 64), np.float32)})["y"]
    from gguf.quants import dequantize

    np.testing.assert_allclose(y, np.ones((3, 64), np.float32) @ dequantize(w, T.Q8_0).T, rtol=1e-6)
    assert node.memory.used == 4096    # the buffer alone: no float copy of the weight
    b.free_buffer(buf)
    assert node.memory.used == 0


def test_device_specs():
    from llamarpc.rpcserver.device import open_device

    assert open_device("cpu").is_cpu
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        open_device("tpu")
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs cupy"):
            open_device("cuda:0")


def test_in_process_node_reads_the_file_map_in_place(tmp_path):
    """One in-process stage uses the GGUF's memory map as its weights buffer: nothing is copied or
    sent, the node accounts the file's bytes, and that buffer refuses writes."""
    from llamarpc.frontend.engine import load_model
    from synth import write_model

    m = write_model(tmp_path / "m.gguf", qtype=T.Q4_0)
    node = Node("cpu", capacity=1 << 28)
    model = load_model(str(m.path), [LocalBackend(node=node)], n_ctx=64)
    try:
        (stage,) = model.pipeline.stages
        assert model.pipeline.bytes_sent == 0
        session = next(iter(node._sessions))
        buf = node.memory.get(session, stage.weights_buffer)
        assert np.shares_memory(buf.data, model.gguf.span(0, m.path.stat().st_size))
        assert node.memory.used == stage.weight_bytes + stage.kv_bytes
        total = sum(t.nbytes for t in model.gguf.tensors.values())
        assert total <= stage.weight_bytes <= 1.15 * total
        with pytest.raises(InvalidArgument, match="read-only"):
            node.set_tensor(session, stage.weights_buffer, 0, b"\0" * 32)
        with pytest.raises(InvalidArgument, match="read-only"):
            node.clear_buffer(session, stage.weights_buffer)
    finally:
        model.close()
