"""LoRA adapters on synthetic models: the output with an adapter equals a model whose weights are
merged (W + scale * alpha / r * B @ A, float32), scale 0 equals the base, two adapters and the
output head, split over two nodes, compiled programs, per-row scales in one batch, and clear
startup errors for a wrong adapter."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from llamarpc.client.local import LocalBackend
from llamarpc.frontend.engine import LogitsProbe, load_model
from llamarpc.frontend.engine.forward import forward_micro_batches
from llamarpc.frontend.engine.kv_cells import KVCells
from llamarpc.frontend.model.gguf_file import ModelLoadError
from llamarpc.frontend.model.lora import parse_scales
from llamarpc.rpcserver import program
from llamarpc.rpcserver.node import Node
from synth import write_model
from synth_lora import merged, write_adapter

TOKENS = [5, 70, 100, 3, 200, 33, 150, 9]


def _close(got: np.ndarray, want: np.ndarray) -> bool:
    return float(np.abs(got - want).max()) <= 2e-5 * float(np.abs(want).max()) + 1e-5


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    m = write_model(d / "base.gguf", n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, seed=3, tied=False)
    a1 = write_adapter(d / "a1.gguf", m, rank=8, alpha=16.0, seed=1, extra=("output.weight",))
    a2 = write_adapter(d / "a2.gguf", m, rank=4, alpha=0.0, seed=2, targets=("attn_q", "ffn_down"), layers=[1])
    return d, m, a1, a2


def _logits(path, lora=(), backends=None, n_batch=512):
    model = load_model(str(path), backends or [LocalBackend()], n_ctx=64, lora=lora)
    try:
        return LogitsProbe(model, n_batch=n_batch).eval(TOKENS, all_logits=True)
    finally:
        model.close()


def _merged_model(d, m, name, adapters):
    return write_model(d / name, n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, seed=3, tied=False,
                       replace=merged(m, adapters)).path


def test_adapter_equals_merged_weights(base):
    d, m, a1, _ = base
    got = _logits(m.path, [(str(d / "a1.gguf"), 0.75)])
    want = _logits(_merged_model(d, m, "merged1.gguf", [(a1, 0.75, 16.0)]))
    plain = _logits(m.path)
    assert _close(got, want)
    assert not _close(got, plain)          # the adapter changes the output


def test_f16_adapter_equals_merged_weights(base):
    d, m, _, _ = base
    pairs = write_adapter(d / "h.gguf", m, rank=16, alpha=32.0, seed=4, f16=True, extra=("output.weight",))
    got = _logits(m.path, [(str(d / "h.gguf"), 1.0)])
    assert _close(got, _logits(_merged_model(d, m, "merged_h.gguf", [(pairs, 1.0, 32.0)])))


def test_two_adapters_alpha_zero_and_two_nodes(base):
    d, m, a1, a2 = base
    specs = [(str(d / "a1.gguf"), -0.5), (str(d / "a2.gguf"), 2.0)]
    want = _logits(_merged_model(d, m, "merged2.gguf", [(a1, -0.5, 16.0), (a2, 2.0, 0.0)]))
    assert _close(_logits(m.path, specs), want)
    two = _logits(m.path, specs, [LocalBackend(node=Node()), LocalBackend(node=Node())], n_batch=3)
    assert _close(two, want)


def test_scale_zero_equals_base(base):
    d, m, _, _ = base
    plain = _logits(m.path)
    got = _logits(m.path, [(str(d / "a1.gguf"), 0.0), (str(d / "a2.gguf"), 0.0)])
    assert np.array_equal(got, plain)


def _decode_programs(node: Node) -> list:
    return [p for g in node._graphs.values() for plan in g.values()
            for sig, p in plan.programs.items() if p is not None and sig[1] == (1,)]


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_compiled_programs_equal_step_by_step(tmp_path, monkeypatch, mode):
    """An F16 adapter's matmuls, scale MULs and ADDs all get records: a decode program has as many
    Python steps as without the adapter, and computes what the step-by-step executor does."""
    m = write_model(tmp_path / "q.gguf", qtype=T.Q8_0, n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128,
                    tied=False)
    write_adapter(tmp_path / "a.gguf", m, rank=8, alpha=16.0, extra=("output.weight",), f16=True)
    outs, python_steps = [], {}
    for lora, enabled in (((), True), ([(str(tmp_path / "a.gguf"), 1.0)], False), ([(str(tmp_path / "a.gguf"), 1.0)], True)):
        monkeypatch.setattr(program, "ENABLED", enabled)
        node = Node(matmul_mode=mode)
        model = load_model(str(m.path), [LocalBackend(node=node)], n_ctx=64, lora=lora)
        try:
            probe = LogitsProbe(model)
            out = [probe.eval(TOKENS[:4], all_logits=True)]
            for t in TOKENS[4:]:                 # decode steps: the compiled path
                out.append(probe.eval([t])[None])
            outs.append(np.concatenate(out))
            if enabled:
                (prog,) = _decode_programs(node)
                assert prog.runs >= 3
                python_steps[bool(lora)] = sum(not isinstance(seg, np.ndarray) for seg in prog.segments)
        finally:
            model.close()
    assert np.array_equal(outs[1], outs[2])
    assert python_steps[True] == python_steps[False]


def test_per_row_scales_share_a_batch(base):
    """Two sequences with different scales in one forward equal each run alone."""
    d, m, _, _ = base
    model = load_model(str(m.path), [LocalBackend()], n_ctx=64, lora=[(str(d / "a1.gguf"), 1.0)])
    try:
        p = model.pipeline

        def run(seqs):
            kv = KVCells(64)
            toks = np.array([t for _, ts in seqs for t in ts], np.int32)
            pos = np.array([i for _, ts in seqs for i in range(len(ts))], np.int32)
            seq = np.array([j for j, (_, ts) in enumerate(seqs) for _ in ts], np.int32)
            lora = np.array([[s] for s, ts in seqs for _ in ts], np.float32)
            want = np.ones(toks.size, bool)
            return forward_micro_batches(p, kv, toks, pos, seq, want, 512, lora)

        both = run([(0.0, TOKENS[:5]), (1.5, TOKENS[2:])])
        first = run([(0.0, TOKENS[:5])])
        second = run([(1.5, TOKENS[2:])])
        assert _close(both, np.concatenate([first, second]))
        assert not _close(first, run([(1.5, TOKENS[:5])]))
    finally:
        model.close()


def test_no_adapter_builds_the_plain_graph(base):
    d, m, _, _ = base
    model = load_model(str(m.path), [LocalBackend()], n_ctx=64)
    with_a = load_model(str(m.path), [LocalBackend()], n_ctx=64, lora=[(str(d / "a1.gguf"), 1.0)])
    try:
        assert model.adapters == [] and all(not s.lora.inputs and s.lora.buffer == 0 for s in model.pipeline.stages)
        assert all(s.lora.inputs for s in with_a.pipeline.stages)
    finally:
        model.close()
        with_a.close()


@pytest.mark.parametrize("kind,message", [
    ("arch", "architecture 'qwen2' does not match the model's 'llama'"),
    ("shape", "'blk.0.attn_k.weight' has an incorrect shape"),
    ("type", "expected general.type 'adapter'"),
    ("missing", "does not exist in the base model"),
])
def test_wrong_adapter_is_a_clear_startup_error(base, tmp_path, kind, message):
    _, m, _, _ = base
    path = tmp_path / f"{kind}.gguf"
    if kind == "arch":
        write_adapter(path, m, arch="qwen2")
    elif kind == "shape":
        write_adapter(path, m, bad_shape="blk.0.attn_k.weight")
    elif kind == "type":
        write_adapter(path, m, general_type="model")
    else:
        small = write_model(tmp_path / "small.gguf", n_layer=3, n_embd=64, n_head=4, n_head_kv=2, n_ff=128)
        write_adapter(path, small, layers=[2])
    with pytest.raises(ModelLoadError, match=message) as e:
        load_model(str(m.path), [LocalBackend()], n_ctx=64, lora=[(str(path), 1.0)])
    assert str(path) in str(e.value)


def test_task_params_json_lists_every_adapter():
    from llamarpc.frontend.engine import TaskParams

    assert TaskParams(lora=(0.0, 0.5)).to_json()["lora"] == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.5}]
    assert TaskParams().to_json()["lora"] == []


def test_parse_scales(base):
    d, m, _, _ = base
    model = load_model(str(m.path), [LocalBackend()], n_ctx=64,
                       lora=[(str(d / "a1.gguf"), 1.0), (str(d / "a2.gguf"), 1.0)])
    try:
        ads = model.adapters
        assert parse_scales([{"id": 1, "scale": 0.5}], ads) == (0.0, 0.5)    # unlisted: 0
        assert parse_scales([], ads) == (0.0, 0.0)
        for bad in ({"id": 0}, [{"id": 2, "scale": 1}], [{"id": True, "scale": 1}], [{"id": 0, "scale": "x"}], [3]):
            with pytest.raises(ValueError):
                parse_scales(bad, ads)
    finally:
        model.close()


def _greedy(engine, prompt, n=8, **kw) -> list[int]:
    from llamarpc.frontend.engine import FinalEvent, PartialEvent, TaskParams
    from llamarpc.frontend.sampling import SamplingParams

    params = TaskParams(sampling=SamplingParams(temperature=0.0), n_predict=n, **kw)
    toks: list[int] = []
    for ev in engine.stream(prompt, params):
        if isinstance(ev, PartialEvent):
            toks += ev.tokens
        if isinstance(ev, FinalEvent):
            break
    return toks


def test_engine_per_request_scales_and_prompt_cache(base):
    """Per request: scale 0 generates as the base model, scale 1 as the merged model; the global
    scale applies when a request names none; a slot's cached prompt is not reused across scales."""
    import threading

    from llamarpc.frontend.engine import Engine, EngineConfig

    d, m, a1, _ = base
    merged_path = _merged_model(d, m, "merged_e.gguf", [(a1, 1.0, 16.0)])

    def engine(path, lora=(), n_parallel=1):
        e = Engine(load_model(str(path), [LocalBackend()], n_ctx=128, lora=lora),
                   EngineConfig(n_parallel=n_parallel, warmup=False))
        e.start()
        return e

    plain, mer = engine(m.path), engine(merged_path)
    eng = engine(m.path, [(str(d / "a1.gguf"), 1.0)], n_parallel=2)
    try:
        prompt = TOKENS
        want_plain, want_merged = _greedy(plain, prompt), _greedy(mer, prompt)
        assert want_plain != want_merged
        assert _greedy(eng, prompt) == want_merged                 # global scale 1.0
        assert _greedy(eng, prompt, lora=(0.0,)) == want_plain     # same prompt: cache not reused
        assert _greedy(eng, prompt, lora=(1.0,)) == want_merged
        eng.model.adapters[0].scale = 0.0
        assert _greedy(eng, prompt) == want_plain
        out: dict[str, list[int]] = {}
        ts = [threading.Thread(target=lambda k=k, s=s: out.__setitem__(k, _greedy(eng, prompt, lora=(s,))))
              for k, s in (("a", 0.0), ("b", 1.0))]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        assert out == {"a": want_plain, "b": want_merged}          # one batch, two scales
    finally:
        for e in (plain, mer, eng):
            e.stop()
            e.model.close()


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_other_architectures_equal_the_merged_reference(tmp_path, arch):
    """The adapter terms come from the shared matmul, so every architecture module gets them: the
    output equals the architecture's numpy reference run on merged weights."""
    import dataclasses

    from synth_arch import gemma3_reference, llama_like_reference, write_gemma3, write_llama_like

    if arch == "gemma3":
        m, ref = write_gemma3(tmp_path / "m.gguf", n_layer=2), gemma3_reference
    else:
        m, ref = write_llama_like(tmp_path / "m.gguf", arch), llama_like_reference
    pairs = write_adapter(tmp_path / "a.gguf", m, rank=4, alpha=8.0, layers=[0, 1])
    got = _logits(m.path, [(str(tmp_path / "a.gguf"), 0.8)])
    want = ref(dataclasses.replace(m, weights={**m.weights, **merged(m, [(pairs, 0.8, 8.0)])}), TOKENS)
    base_ref = ref(m, TOKENS)
    assert np.abs(got - want).max() <= 5e-5 * np.abs(want).max() + 1e-4
    assert np.abs(want - base_ref).max() > 1e-2


def test_fused_phi3_weight_is_refused(tmp_path):
    from synth_arch import write_llama_like

    m = write_llama_like(tmp_path / "m.gguf", "phi3")
    write_adapter(tmp_path / "a.gguf", m, targets=("attn_qkv",), layers=[0])
    with pytest.raises(ValueError, match="blk.0.attn_qkv.weight: this architecture's graph does not multiply"):
        load_model(str(m.path), [LocalBackend()], n_ctx=64, lora=[(str(tmp_path / "a.gguf"), 1.0)])


def test_node_rejects_a_bad_scale_input(base):
    """The scale inputs are checked by the node like any input: a wrong shape is INVALID_ARGUMENT and
    the node keeps serving."""
    from llamarpc.proto.errors import InvalidArgument

    d, m, _, _ = base
    model = load_model(str(m.path), [LocalBackend()], n_ctx=64, lora=[(str(d / "a1.gguf"), 1.0)])
    try:
        s = model.pipeline.stages[0]
        n = 3
        ins = {"tokens": np.array([1, 2, 3], np.int32), "pos": np.arange(n, dtype=np.int32),
               "seq": np.zeros(n, np.int32), "cells": np.arange(n, dtype=np.int32),
               "kv_pos": np.arange(n, dtype=np.int32), "kv_seq": np.zeros(n, np.int32),
               "out_rows": np.array([2], np.int32), "lora.0.8": np.ones((n, 8), np.float32),
               "lora_out.0.8": np.ones((1, 8), np.float32)}
        assert sorted(i.name for i in s.lora.inputs) == ["lora.0.8", "lora_out.0.8"]
        assert s.backend.compute(s.graph_id, ins)["logits"].shape == (1, m.n_vocab)
        for name, bad in (("lora.0.8", np.ones((n + 1, 8), np.float32)), ("lora.0.8", np.ones((n, 2), np.float32)),
                          ("lora_out.0.8", np.ones((2, 8), np.float32)), ("lora.0.8", np.ones((n, 8), np.int32))):
            with pytest.raises(InvalidArgument):
                s.backend.compute(s.graph_id, {**ins, name: bad})
        assert s.backend.compute(s.graph_id, ins)["logits"].shape == (1, m.n_vocab)
    finally:
        model.close()


def test_over_grpc_node_equals_in_process(base, tmp_path):
    """A/B go to a real llamarpc-server process through the stage set-up (set_tensors, from its
    cache the second time): the logits equal the in-process ones."""
    from llamarpc.client.remote import RemoteBackend
    from nodeproc import start_node

    d, m, _, _ = base
    specs = [(str(d / "a1.gguf"), 0.7), (str(d / "a2.gguf"), -1.0)]
    local = _logits(m.path, specs)
    with start_node(tmp_path) as node:
        for _ in range(2):
            b = RemoteBackend(node.address)
            model = load_model(str(m.path), [LocalBackend(), b], n_ctx=64, lora=specs, tensor_split=[1, 1])
            try:
                sent = model.pipeline.stages[1].bytes_sent
                got = LogitsProbe(model).eval(TOKENS, all_logits=True)
            finally:
                model.close()
            assert _close(got, local)
        assert sent < 4096      # the second time the weights and A/B came from the node's cache


def test_node_restarted_mid_stream_replays_with_the_request_scales(base):
    """A node that restarts loses its A/B with its KV cache: re-attached, it gets them again and the
    replay runs with each slot's own scales, so the stream equals the merged model's."""
    import time

    from llamarpc.frontend.engine import Engine, EngineConfig, FinalEvent, PartialEvent, Task, TaskParams
    from llamarpc.frontend.sampling import SamplingParams

    class Restarting(LocalBackend):
        restarted = False

        @property
        def alive(self) -> bool:
            return not self.restarted

        def reconnect(self):
            self.restarted = False
            return self.hello()

    d, m, a1, _ = base
    node = Restarting()
    eng = Engine(load_model(str(m.path), [LocalBackend(), node], n_ctx=128, lora=[(str(d / "a1.gguf"), 0.0)]),
                 EngineConfig(n_parallel=2, warmup=False))
    ref = Engine(load_model(str(_merged_model(d, m, "merged_r.gguf", [(a1, 1.0, 16.0)])), [LocalBackend()], n_ctx=128),
                 EngineConfig(warmup=False))
    eng.start()
    ref.start()
    try:
        params = TaskParams(sampling=SamplingParams(temperature=0.0), n_predict=30, ignore_eos=True, lora=(1.0,))
        want = _greedy(ref, TOKENS, 30, ignore_eos=True)
        events: list = []
        eng.submit(Task(list(TOKENS), params, events.append))
        while sum(isinstance(e, PartialEvent) for e in events) < 5:
            time.sleep(0.002)
        node.restarted = True
        deadline = time.monotonic() + 60
        while not any(isinstance(e, FinalEvent) for e in events) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert isinstance(events[-1], FinalEvent), events[-1]
        assert [t for e in events if isinstance(e, PartialEvent) for t in e.tokens] == want
        assert eng.model.pipeline.epoch == 1
    finally:
        for e in (eng, ref):
            e.stop()
            e.model.close()
