"""Synthetic LoRA adapter GGUFs (gguf.GGUFWriter, random A/B) for a synthetic base model, and the
merged weights W + scale * alpha / r * B @ A they stand for."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np
from llamarpc.frontend.model.gguf_file import GGUFFile
from synth import SynthModel

DEFAULT_TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def write_adapter(path: Path, m: SynthModel, *, rank: int = 8, alpha: float = 16.0, seed: int = 7,
                  targets: Sequence[str] = DEFAULT_TARGETS, layers: Sequence[int] | None = None,
                  extra: Sequence[str] = (), arch: str | None = None, general_type: str = "adapter",
                  bad_shape: str | None = None, f16: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write an adapter for the `targets` of `layers` (all) plus the whole tensors named in `extra`
    (e.g. output.weight); returns base name -> (A [r, n_in], B [n_out, r]) as float32. `bad_shape`
    names a tensor whose A gets one column too many; `f16` stores A/B as F16."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch or m.arch)
    w.add_string("general.type", general_type)
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", alpha)
    names = [f"blk.{i}.{t}.weight" for i in (range(m.n_layer) if layers is None else layers) for t in targets]
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    shapes = {n: t.shape for n, t in GGUFFile(m.path).tensors.items()}   # as stored (fused ones too)
    for name in [*names, *extra]:
        n_out, n_in = shapes[name]
        a = (rng.standard_normal((rank, n_in + (name == bad_shape))) * 0.1).astype(np.float32)
        b = (rng.standard_normal((n_out, rank)) * 0.1).astype(np.float32)
        if f16:     # stored as F16 (convert_lora_to_gguf's default); the float32 values are those
            a, b = a.astype(np.float16), b.astype(np.float16)
        w.add_tensor(f"{name}.lora_a", a)
        w.add_tensor(f"{name}.lora_b", b)
        a, b = a.astype(np.float32), b.astype(np.float32)
        out[name] = (a, b)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def merged(m: SynthModel, adapters: Sequence[tuple[dict[str, tuple[np.ndarray, np.ndarray]], float, float]]
           ) -> dict[str, np.ndarray]:
    """The base weights with each (pairs, scale, alpha) folded in: W + scale * alpha / r * B @ A."""
    out: dict[str, np.ndarray] = {}
    for pairs, scale, alpha in adapters:
        for name, (a, b) in pairs.items():
            s = scale * alpha / a.shape[0] if alpha else scale
            base = out.get(name, m.weights[name]).astype(np.float64)
            out[name] = (base + s * (b.astype(np.float64) @ a.astype(np.float64))).astype(np.float32)
    return out
