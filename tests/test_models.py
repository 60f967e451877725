"""Tiny synthetic GGUFs (random weights) for each architecture and weight type: the engine's
logits equal a plain numpy forward; broken files fail with one clear line."""
from __future__ import annotations

import struct
import subprocess
import sys

import numpy as np
import pytest
from conftest import greedy
from llamarpc.client.local import LocalBackend
from llamarpc.frontend.engine import LogitsProbe, load_model
from llamarpc.frontend.model.gguf_file import ModelLoadError
from synth import KQUANTS, QUANTIZABLE, reference_logits, write_model

TOKENS = [5, 70, 100, 3, 200, 33, 150, 261]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("qtype", QUANTIZABLE + KQUANTS, ids=lambda t: t.name)
def test_synthetic_model_matches_reference(tmp_path, arch, qtype):
    m = write_model(tmp_path / "m.gguf", arch, qtype, tied=qtype.name != "Q8_0")
    model = load_model(str(m.path), [LocalBackend()], n_ctx=64)
    try:
        ref = reference_logits(m, TOKENS)
        got = LogitsProbe(model, n_batch=3).eval(TOKENS, all_logits=True)  # 3 chunks through the cache
        scale = np.abs(ref).max()
        assert np.abs(got - ref).max() <= 5e-5 * scale + 1e-4, (arch, qtype.name)  # float32 vs float64
    finally:
        model.close()


def test_incremental_decode_equals_full_forward(tmp_path):
    m = write_model(tmp_path / "m.gguf", "llama")
    model = load_model(str(m.path), [LocalBackend()], n_ctx=64)
    full = LogitsProbe(model, n_batch=64).eval(TOKENS, all_logits=True)
    g = LogitsProbe(model, n_batch=64)
    steps = [g.eval([t]) for t in TOKENS]
    assert np.abs(np.stack(steps) - full).max() <= 1e-5 * np.abs(full).max()  # float32 noise
    model.close()


def _run_cli(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llamarpc.frontend.cli", "-m", str(path), "-p", "hi", "-n", "2"],
                          capture_output=True, text=True, timeout=120)


def test_cli_one_shot_is_an_engine_task(tmp_path):
    """`llamarpc -p` prints what one engine task generates, and takes the server's sampling flags."""
    m = write_model(tmp_path / "m.gguf", "llama")
    model = load_model(str(m.path), [LocalBackend()], n_ctx=64)
    try:
        tok = model.tokenizer
        want = greedy(model, tok.encode("hi", add_special=True, parse_special=True), 6, ignore_eos=True)
        dec = tok.streaming_decoder()
        text = "".join(dec.feed(t) for t in want) + dec.flush()
    finally:
        model.close()
    argv = [sys.executable, "-m", "llamarpc.frontend.cli", "-m", str(m.path), "-p", "hi", "-n", "6", "--temp", "0",
            "--ignore-eos", "--no-display-prompt"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == text + "\n" and "/     6 tokens" in r.stderr
    banned = subprocess.run([*argv, "-l", f"{want[0]}-inf"], capture_output=True, text=True, timeout=120)
    assert banned.returncode == 0 and banned.stdout != r.stdout     # --logit-bias reaches the one-shot run


def _one_error_line(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("llamarpc: error:")]
    assert len(errors) == 1, r.stderr
    for n in needles:
        assert n in errors[0], errors[0]


def _patch_tensor_type(path, name: str, new_type: int) -> None:
    data = bytearray(path.read_bytes())
    key = struct.pack("<Q", len(name)) + name.encode()
    at = data.index(key) + len(key)
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, new_type)
    path.write_bytes(bytes(data))


def test_unknown_architecture(tmp_path):
    m = write_model(tmp_path / "m.gguf", "llama")
    data = m.path.read_bytes().replace(b"llama", b"lla_x")  # the arch value and its keys
    (tmp_path / "x.gguf").write_bytes(data)
    with pytest.raises(ModelLoadError, match="unknown model architecture 'lla_x'"):
        load_model(str(tmp_path / "x.gguf"), [LocalBackend()])
    _one_error_line(_run_cli(tmp_path / "x.gguf"), "unknown model architecture 'lla_x'")


def test_unknown_tensor_type(tmp_path):
    m = write_model(tmp_path / "m.gguf", "llama")
    _patch_tensor_type(m.path, "blk.0.attn_q.weight", 250)
    _one_error_line(_run_cli(m.path), "unknown tensor type", "250")


def test_missing_tensor(tmp_path):
    m = write_model(tmp_path / "m.gguf", "llama", skip_tensor="blk.1.ffn_up.weight")
    _one_error_line(_run_cli(m.path), "missing tensor 'blk.1.ffn_up.weight'")


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.01])
def test_truncated_file(tmp_path, keep):
    m = write_model(tmp_path / "m.gguf", "llama")
    data = m.path.read_bytes()
    m.path.write_bytes(data[: int(len(data) * keep)])
    _one_error_line(_run_cli(m.path), "truncated")


def test_missing_file(tmp_path):
    # found while the flags are parsed: a usage error (exit 2), one line naming the flag and file
    r = _run_cli(tmp_path / "nope.gguf")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("llamarpc: error:")]
    assert len(errors) == 1 and "-m/--model" in errors[0] and "nope.gguf: no such file" in errors[0], r.stderr


def test_f16_kv_cache_close_to_f32(tmp_path):
    from llamarpc.proto.types import GGMLType

    m = write_model(tmp_path / "m.gguf", "llama")
    f32 = load_model(str(m.path), [LocalBackend()], n_ctx=64)
    f16 = load_model(str(m.path), [LocalBackend()], n_ctx=64, kv_type=GGMLType.F16)
    try:
        assert f16.pipeline.stages[0].kv_bytes * 2 == f32.pipeline.stages[0].kv_bytes
        a = LogitsProbe(f32, n_batch=3).eval(TOKENS, all_logits=True)
        b = LogitsProbe(f16, n_batch=3).eval(TOKENS, all_logits=True)
        assert 0 < np.abs(a - b).max() <= 1e-2 * np.abs(a).max()   # rounded K/V, same answer
    finally:
        f32.close()
        f16.close()


def test_cache_type_flags(tmp_path):
    m = write_model(tmp_path / "m.gguf", "llama")
    r = subprocess.run([sys.executable, "-m", "llamarpc.frontend.cli", "-m", str(m.path), "-p", "hi", "-n", "2",
                        "-ctk", "f16", "-ctv", "f32"], capture_output=True, text=True, timeout=120)
    _one_error_line(r, "-ctk f16 and -ctv f32 differ")
    r = subprocess.run([sys.executable, "-m", "llamarpc.frontend.cli", "-m", str(m.path), "-p", "hi", "-n", "2",
                        "-ctk", "f16"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
