"""Gemma 3: the per-head RMS_NORM (QK-norm) op on every path, the gemma3 architecture on synthetic
GGUFs against a plain numpy forward (sliding window, local/global rope bases, post-norms, softcap),
and its metadata rules. The real model's tests are in test_gemma3_real.py."""
from __future__ import annotations

import array_api_strict
import numpy as np
import pytest
from array_api_compat import array_namespace
from gguf import GGMLQuantizationType as T
from llamarpc.client import GraphBuilder, TensorRef
from llamarpc.client.local import LocalBackend
from llamarpc.frontend.engine import LogitsProbe, load_model
from llamarpc.frontend.model.arch import gemma3
from llamarpc.proto.errors import InvalidArgument
from llamarpc.proto.types import GGMLType
from llamarpc.rpcserver import kernels as K
from llamarpc.rpcserver import program
from llamarpc.rpcserver.node import PROTOCOL_VERSION, Node
from synth_arch import gemma3_reference, write_gemma3

RNG = np.random.default_rng(7)


def _head_norm_ref(x: np.ndarray, w: np.ndarray, d: int, eps: float) -> np.ndarray:
    h = x.astype(np.float64).reshape(x.shape[0], -1, d)
    return (h / np.sqrt((h * h).mean(-1, keepdims=True) + eps) * w).reshape(x.shape)


@pytest.mark.parametrize("xp", [array_namespace(np.empty(0)), array_api_strict], ids=["numpy", "strict"])
def test_rms_norm_groups_kernel(xp):
    x = RNG.standard_normal((5, 4 * 16)).astype(np.float32) * 3
    w = RNG.standard_normal(16).astype(np.float32)
    got = np.asarray(K.rms_norm_groups(xp, xp.asarray(x), 1e-6, 16, xp.asarray(w)))
    np.testing.assert_allclose(got, _head_norm_ref(x, w, 16, 1e-6), rtol=1e-5, atol=1e-6)
    whole = np.asarray(K.rms_norm_groups(xp, xp.asarray(x), 1e-6, 0))     # group 0: the whole row
    np.testing.assert_allclose(whole, _head_norm_ref(x, 1.0, 64, 1e-6), rtol=1e-5, atol=1e-6)
    for bad in ((xp.asarray(x), 24, None), (xp.asarray(x), 16, xp.asarray(w[:8]))):
        with pytest.raises(K.ShapeError):
            K.rms_norm_groups(xp, bad[0], 1e-6, bad[1], bad[2])


def _norm_graph(node: Node, x: np.ndarray, w: np.ndarray, d: int, *, then_mul: bool = False):
    sess = node.hello(PROTOCOL_VERSION, "t").session_id
    buf = node.alloc_buffer(sess, w.nbytes * 2)
    node.set_tensor(sess, buf, 0, w.tobytes())
    node.set_tensor(sess, buf, w.nbytes, w.tobytes())
    gb = GraphBuilder()
    xi = gb.input("x", GGMLType.F32, ("n", x.shape[1]))
    wv = gb.tensor(TensorRef(buf, 0, GGMLType.F32, (d,)))
    y = gb.head_rms_norm(xi, wv, 1e-6, d)
    if then_mul:   # a MUL after a grouped norm must not be fused into an ungrouped rms_norm_mul
        y = gb.mul(y, gb.tensor(TensorRef(buf, w.nbytes, GGMLType.F32, (d,))))
    gb.output("y", y)
    gid = node.register_graph(sess, gb.build())
    return node.compute(sess, gid, {"x": x})["y"]


@pytest.mark.parametrize("enabled", [False, True], ids=["executor", "program"])
def test_head_rms_norm_on_a_node(monkeypatch, enabled):
    """The op through the node, step by step and as a compiled program: bit for bit the reference
    of each head's rows (the C norm over N*H rows of head_dim), times the weight."""
    monkeypatch.setattr(program, "ENABLED", enabled)
    x = RNG.standard_normal((3, 4 * 32)).astype(np.float32)
    w = RNG.standard_normal(32).astype(np.float32)
    want = (np.asarray(K.rms_norm(np, x.reshape(12, 32), 1e-6)) * w).reshape(3, 128)
    for _ in range(3):  # runs more than once so a program is made and used
        got = _norm_graph(Node(), x, w, 32)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got, _head_norm_ref(x, w, 32, 1e-6), rtol=1e-5, atol=1e-6)
    with pytest.raises(InvalidArgument, match="multiple of head_dim"):
        _norm_graph(Node(), RNG.standard_normal((2, 40)).astype(np.float32), w, 32)


def test_grouped_norm_followed_by_mul_is_not_fused():
    x = RNG.standard_normal((2, 32)).astype(np.float32)
    w = RNG.standard_normal(32).astype(np.float32)
    got = _norm_graph(Node(), x, w, 32, then_mul=True)
    np.testing.assert_allclose(got, _head_norm_ref(x, w, 32, 1e-6) * w, rtol=1e-5, atol=1e-6)


TOKENS = [5, 70, 100, 3, 200, 33, 150, 261, 9, 40]   # longer than the window (4): it matters


@pytest.mark.parametrize("qtype,softcap", [(T.F32, 0.0), (T.Q8_0, 0.0), (T.F32, 5.0)], ids=["f32", "q8_0", "softcap"])
def test_synthetic_gemma3_matches_reference(tmp_path, qtype, softcap):
    m = write_gemma3(tmp_path / "g.gguf", qtype, final_softcap=softcap)
    model = load_model(str(m.path), [LocalBackend()], n_ctx=64)
    try:
        assert model.args.local_layers == (True, True, False)
        ref = gemma3_reference(m, TOKENS)
        got = LogitsProbe(model, n_batch=3).eval(TOKENS, all_logits=True)   # chunks through the cache
        assert np.abs(got - ref).max() <= 5e-5 * np.abs(ref).max() + 1e-4
        if softcap:
            assert np.abs(got).max() < softcap
        # the window is applied: a reference without it differs
        m.hp["window"] = 0
        assert np.abs(gemma3_reference(m, TOKENS) - ref).max() > 1e-2
    finally:
        model.close()


def test_synthetic_gemma3_two_nodes_equal_in_process(tmp_path):
    m = write_gemma3(tmp_path / "g.gguf", T.Q8_0)
    local = load_model(str(m.path), [LocalBackend()], n_ctx=64)
    split = load_model(str(m.path), [LocalBackend(node=Node()), LocalBackend(node=Node())], n_ctx=64,
                       tensor_split=[1, 2])
    try:
        a = [LogitsProbe(local).eval(TOKENS)] + [LogitsProbe(local).eval(TOKENS[:3])]
        b = [LogitsProbe(split).eval(TOKENS)] + [LogitsProbe(split).eval(TOKENS[:3])]
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
    finally:
        local.close()
        split.close()


def _args(md: dict) -> gemma3.Gemma3Args:
    base = {"general.architecture": "gemma3", "gemma3.block_count": 12, "gemma3.embedding_length": 64,
            "gemma3.feed_forward_length": 128, "gemma3.attention.head_count": 4,
            "gemma3.attention.key_length": 32, "gemma3.attention.sliding_window": 512,
            "gemma3.rope.freq_base": 1e6}
    return gemma3.args_from_metadata({**base, **md}, {"token_embd.weight": (300, 64)})


def test_metadata_rules():
    a = _args({})
    # llama.cpp's rule: every 6th layer global, with the metadata's rope base; the others local
    assert [i for i in range(12) if not a.local_layers[i]] == [5, 11]
    assert a.rope(5) == (1e6, 1.0) and a.rope(0) == (10000.0, 1.0)
    assert a.attn_scale == 32 ** -0.5 and a.final_softcap == 0.0 and a.tied_output and a.kv_dim == 4 * 32
    assert _args({"gemma3.attention.sliding_window_pattern": 4}).local_layers[:4] == (True, True, True, False)
    per_layer = [i % 2 == 0 for i in range(12)]
    assert list(_args({"gemma3.attention.sliding_window_pattern": per_layer}).local_layers) == per_layer
    assert not any(_args({"gemma3.attention.sliding_window": 0}).local_layers)
    scaled = _args({"gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0,
                    "gemma3.final_logit_softcapping": 30.0})
    assert scaled.rope(5) == (1e6, 0.125) and scaled.rope(0) == (10000.0, 1.0) and scaled.final_softcap == 30.0
    with pytest.raises(ValueError, match="sliding_window_pattern"):
        _args({"gemma3.attention.sliding_window_pattern": [True]})
    with pytest.raises(ValueError, match="value_length"):
        _args({"gemma3.attention.value_length": 16})
