"""Compiled programs (rpcserver/program.py) compute bit for bit what the step-by-step executor
computes: synthetic models of each architecture and weight type in both matmul modes, prompts of a
few tokens and token-by-token decode (where the visible cache grows every step without a new
program), and the same errors for bad ids and cells."""
from __future__ import annotations

import numpy as np
import pytest
from llamarpc.client.local import LocalBackend
from llamarpc.frontend.engine.loader import load_model
from llamarpc.frontend.engine.probe import LogitsProbe
from llamarpc.proto.errors import InvalidArgument
from llamarpc.proto.types import GGMLType as T
from llamarpc.rpcserver import program
from llamarpc.rpcserver.node import Node
from synth import write_model


def _plans(node: Node) -> list:
    return [p for graphs in node._graphs.values() for p in graphs.values()]


def _logits(path, mode: str, enabled: bool, monkeypatch) -> tuple[np.ndarray, list]:
    monkeypatch.setattr(program, "ENABLED", enabled)
    node = Node(matmul_mode=mode)
    m = load_model(str(path), [LocalBackend(node=node)], n_ctx=64)
    try:
        out = []
        for seq, prompt in ((0, [5, 17, 99, 3, 42, 7, 11]), (1, [8, 9, 10])):
            probe = LogitsProbe(m, seq=seq)
            out.append(probe.eval(prompt, all_logits=True))
            for _ in range(6):
                out.append(probe.eval([int(np.argmax(out[-1][-1] if out[-1].ndim == 2 else out[-1]))])[None])
            out.append(probe.eval(prompt[:4], all_logits=True))   # a batch again: its program exists
        return np.concatenate(out), _plans(node)
    finally:
        m.close()


@pytest.mark.parametrize("arch,qtype,mode", [
    ("llama", T.Q4_K, "exact"), ("llama", T.Q4_1, "fast"), ("llama", T.Q6_K, "fast"),
    ("qwen2", T.Q8_0, "exact"), ("qwen2", T.F16, "exact"), ("llama", T.F32, "exact"),
])
def test_program_equals_step_by_step(tmp_path, monkeypatch, arch, qtype, mode):
    path = tmp_path / "m.gguf"
    write_model(path, arch, qtype, n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=512)
    want, _ = _logits(path, mode, False, monkeypatch)
    got, plans = _logits(path, mode, True, monkeypatch)
    assert np.array_equal(want, got)
    (plan,) = plans
    progs = [p for p in plan.programs.values() if p is not None]
    # the decode signature (one row) has one program whatever the cache length; so has each batch
    assert progs and sum(p.runs for p in progs) >= 2 * 5 + 1
    one_row = [p for sig, p in plan.programs.items() if p is not None and sig[1] == (1,)]
    assert len(one_row) == 1


def _capture(node: Node) -> list:
    calls = []
    compute = node.compute

    def spy(session, gid, inputs):
        calls.append((session, gid, {k: v.copy() for k, v in inputs.items()}))
        return compute(session, gid, inputs)
    node.compute = spy
    return calls


@pytest.mark.parametrize("enabled", [False, True])
def test_program_rejects_what_the_executor_rejects(tmp_path, monkeypatch, enabled):
    path = tmp_path / "m.gguf"
    write_model(path, "llama", T.Q4_0, n_layer=1, n_embd=128, n_head=2, n_head_kv=1, n_ff=256)
    monkeypatch.setattr(program, "ENABLED", enabled)
    node = Node()
    m = load_model(str(path), [LocalBackend(node=node)], n_ctx=32)
    try:
        calls = _capture(node)
        probe = LogitsProbe(m)
        probe.eval([1, 2, 3])
        probe.eval([4])
        probe.eval([5])   # the one-row program now exists and runs
        session, gid, inputs = calls[-1]
        tok = next(k for k, v in inputs.items() if v.shape == (1,) and int(v[0]) == 5)
        bad = dict(inputs, **{tok: np.array([10 ** 6], np.int32)})
        with pytest.raises(InvalidArgument, match=r"get_rows: ids must be a 1-d array in \[0, \d+\)"):
            node.compute(session, gid, bad)
        cells = next(k for k in inputs if "cell" in k)
        bad = dict(inputs, **{cells: np.array([10 ** 6], np.int32)})
        with pytest.raises(InvalidArgument, match=r"attention: cells must be in \[0, 32\)"):
            node.compute(session, gid, bad)
        out = node.compute(session, gid, inputs)   # and the program still works after an error
        assert all(np.isfinite(v).all() for v in out.values())
        (plan,) = _plans(node)
        assert sum(p.runs for p in plan.programs.values() if p is not None) == (2 if enabled else 0)
    finally:
        m.close()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_program_equals_step_by_step_on_the_real_model(model_path, monkeypatch, mode):
    runs = []
    for enabled in (False, True):
        monkeypatch.setattr(program, "ENABLED", enabled)
        node = Node(matmul_mode=mode)
        m = load_model(str(model_path), [LocalBackend(node=node)], n_ctx=128)
        try:
            probe = LogitsProbe(m)
            out = [probe.eval(m.tokenizer.encode("The lighthouse keeper climbed the stairs"))]
            for _ in range(8):
                out.append(probe.eval([int(np.argmax(out[-1]))]))
            runs.append(np.stack(out))
            (plan,) = _plans(node)
            assert sum(p.runs for p in plan.programs.values() if p is not None) == (7 if enabled else 0)
        finally:
            m.close()
    assert np.array_equal(runs[0], runs[1])
