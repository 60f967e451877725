"""qwen3 (QK-norm, no QKV bias, head_dim apart from n_embd / n_head) and phi3 (fused attn_qkv and
gate-up ffn_up as views of the stored bytes, sliding window on every layer) on synthetic GGUFs
against a plain numpy forward, in process and split over two nodes."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from llamarpc.client import GraphBuilder, TensorRef
from llamarpc.client.local import LocalBackend
from llamarpc.frontend.engine import LogitsProbe, load_model
from llamarpc.frontend.model.gguf_file import ModelLoadError
from llamarpc.proto.types import GGMLType
from llamarpc.rpcserver.node import Node
from synth_arch import llama_like_reference, write_llama_like

TOKENS = [5, 70, 100, 3, 200, 33, 150, 261, 9, 40]


@pytest.mark.parametrize("arch,qtype,window", [("qwen3", T.F32, 0), ("qwen3", T.Q8_0, 0), ("phi3", T.F32, 0),
                                               ("phi3", T.Q8_0, 4)], ids=lambda v: getattr(v, "name", str(v)))
def test_matches_reference(tmp_path, arch, qtype, window):
    m = write_llama_like(tmp_path / "m.gguf", arch, qtype, window=window)
    model = load_model(str(m.path), [LocalBackend()], n_ctx=64)
    try:
        ref = llama_like_reference(m, TOKENS)
        got = LogitsProbe(model, n_batch=3).eval(TOKENS, all_logits=True)
        assert np.abs(got - ref).max() <= 5e-5 * np.abs(ref).max() + 1e-4
        if window:
            m.hp["window"] = 0
            assert np.abs(llama_like_reference(m, TOKENS) - ref).max() > 1e-2
    finally:
        model.close()


@pytest.mark.parametrize("arch", ["qwen3", "phi3"])
def test_two_nodes_equal_in_process(tmp_path, arch):
    m = write_llama_like(tmp_path / "m.gguf", arch, T.Q8_0, n_layer=3)
    local = load_model(str(m.path), [LocalBackend()], n_ctx=64)
    split = load_model(str(m.path), [LocalBackend(node=Node()), LocalBackend(node=Node())], n_ctx=64,
                       tensor_split=[1, 2])
    try:
        assert np.array_equal(LogitsProbe(local).eval(TOKENS), LogitsProbe(split).eval(TOKENS))
    finally:
        local.close()
        split.close()


def test_graph_builder_rows():
    gb = GraphBuilder()
    t = gb.tensor(TensorRef(7, 64, GGMLType.Q8_0, (96, 64)))        # 68 bytes a row
    part = gb.rows(t, 32, 64)
    g = gb.build()
    assert part.kind == "tensor" and g.tensors[1].offset == 64 + 32 * 68 and list(g.tensors[1].shape) == [64, 64]
    for bad in ((t, 90, 10), (t, -1, 2)):
        with pytest.raises(ValueError):
            gb.rows(*bad)


def test_phi3_longrope_is_refused(tmp_path):
    import gguf
    m = write_llama_like(tmp_path / "m.gguf", "phi3", n_layer=1)
    r = gguf.GGUFReader(str(m.path))
    w = gguf.GGUFWriter(str(tmp_path / "lr.gguf"), "phi3")
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_array(f.name, f.contents())
        else:
            w.add_key_value(f.name, f.contents(), vt)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data))
    w.add_tensor("rope_factors_long.weight", np.ones(16, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match="LongRoPE"):
        load_model(str(tmp_path / "lr.gguf"), [LocalBackend()], n_ctx=16)
