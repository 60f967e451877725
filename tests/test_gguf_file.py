"""Our GGUF header parser reads exactly what gguf.GGUFReader reads, and refuses broken files."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader
from llamarpc.frontend.model.gguf_file import GGUFFile, ModelLoadError
from synth import KQUANTS, QUANTIZABLE, write_model


def _same_as_reader(path) -> None:
    ours = GGUFFile(path)
    ref = GGUFReader(path)
    md = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata == md
    assert set(ours.tensors) == {t.name for t in ref.tensors}
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert mine.type == t.tensor_type
        assert mine.shape == tuple(reversed(t.shape.tolist()))
        assert np.array_equal(np.asarray(mine.data), ref.data[t.data_offset:t.data_offset + t.n_bytes])


@pytest.mark.parametrize("qtype", [QUANTIZABLE[0], QUANTIZABLE[3], KQUANTS[-1]], ids=lambda t: t.name)
def test_matches_gguf_reader_synthetic(tmp_path, qtype):
    m = write_model(tmp_path / "m.gguf", "qwen2", qtype)
    _same_as_reader(m.path)


def test_matches_gguf_reader_real_model(model_path):
    _same_as_reader(model_path)


@pytest.mark.parametrize("cut", [3, 20, 100, 2000])
def test_truncated_headers(tmp_path, cut):
    m = write_model(tmp_path / "m.gguf", "llama")
    p = tmp_path / "cut.gguf"
    p.write_bytes(m.path.read_bytes()[:cut])
    with pytest.raises(ModelLoadError, match="truncated|not a GGUF"):
        GGUFFile(p)


def test_hostile_lengths(tmp_path):
    m = write_model(tmp_path / "m.gguf", "llama")
    data = bytearray(m.path.read_bytes())
    data[8:16] = (2**63).to_bytes(8, "little")  # tensor count
    p = tmp_path / "bad.gguf"
    p.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        GGUFFile(p)
    data = bytearray(m.path.read_bytes())
    data[24:32] = (2**62).to_bytes(8, "little")  # the first key's length
    p.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        GGUFFile(p)
    p.write_bytes(b"GGML" + bytes(data[4:]))
    with pytest.raises(ModelLoadError, match="bad magic"):
        GGUFFile(p)


def test_tensor_digests_are_remembered_per_file(tmp_path, monkeypatch):
    import hashlib
    import os

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    m = write_model(tmp_path / "m.gguf", "llama")
    g = GGUFFile(m.path)
    want = {n: hashlib.sha256(t.data).digest() for n, t in g.tensors.items()}
    assert {n: g.digest(n) for n in g.tensors} == want
    files = list((tmp_path / "xdg" / "llamarpc" / "digests").iterdir())
    assert len(files) == 1
    again = GGUFFile(m.path)
    assert again._load_digests() == want          # read back, not recomputed
    # a changed file (new mtime) is hashed afresh, never served stale digests
    data = bytearray(m.path.read_bytes())
    data[-1] ^= 0xFF
    m.path.write_bytes(bytes(data))
    os.utime(m.path, ns=(1, 1))
    changed = GGUFFile(m.path)
    assert changed._load_digests() == {}
    last = list(changed.tensors)[-1]
    assert changed.digest(last) == hashlib.sha256(changed.tensors[last].data).digest() != want[last]
