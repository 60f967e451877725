"""Synthetic GGUFs of the architectures beyond llama/qwen2 (gemma3, ...) with random weights, and
a plain float64 numpy forward of each, written from the architecture's description (not from the
engine's graph) to check the engine against."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from synth import add_byte_tokenizer, add_llama_hparams, byte_vocab, make_weight, to_float


@dataclasses.dataclass
class ArchModel:
    path: Path
    arch: str
    weights: dict[str, np.ndarray]
    hp: dict


def _writer(path: Path, arch: str, hp: dict) -> gguf.GGUFWriter:
    tokens, types, merges = byte_vocab()
    w = gguf.GGUFWriter(str(path), arch)
    add_llama_hparams(w, n_layer=hp["n_layer"], n_ctx=256, n_embd=hp["n_embd"], n_ff=hp["n_ff"],
                      n_head=hp["n_head"], n_head_kv=hp["n_head_kv"], rot=hp["head_dim"], eps=hp["eps"],
                      rope_base=hp["rope_base"])
    w.add_key_length(hp["head_dim"])
    w.add_value_length(hp["head_dim"])
    add_byte_tokenizer(w, tokens, types, merges)
    hp["n_vocab"] = len(tokens)
    return w


def _adder(w: gguf.GGUFWriter, rng: np.random.Generator, weights: dict[str, np.ndarray]):
    def add(name: str, shape: tuple[int, ...], t: T, scale: float = 0.2, shift: float = 0.0) -> None:
        stored = make_weight(rng, shape, t, scale)
        if shift:
            stored = stored + np.float32(shift)
        weights[name] = to_float(stored, t, shape)
        if t in (T.F32, T.F16):
            w.add_tensor(name, stored)
        else:
            w.add_tensor(name, stored, raw_shape=stored.shape, raw_dtype=t)
    return add


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_gemma3(path: Path, qtype: T = T.F32, *, n_layer: int = 3, n_embd: int = 64, n_head: int = 4,
                 n_head_kv: int = 2, head_dim: int = 32, n_ff: int = 128, window: int = 4,
                 pattern: int | None = 3, final_softcap: float = 0.0, seed: int = 0) -> ArchModel:
    hp = dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim, n_ff=n_ff,
              eps=1e-6, rope_base=1e6, window=window, final_softcap=final_softcap,
              pattern=6 if pattern is None else pattern)
    w = _writer(path, "gemma3", hp)
    w.add_sliding_window(window)
    if pattern is not None:
        w.add_uint32("gemma3.attention.sliding_window_pattern", pattern)
    if final_softcap:
        w.add_float32("gemma3.final_logit_softcapping", final_softcap)
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {}
    add = _adder(w, rng, weights)
    add("token_embd.weight", (hp["n_vocab"], n_embd), qtype, 0.2)
    qd, kd = n_head * head_dim, n_head_kv * head_dim
    for i in range(n_layer):
        p = f"blk.{i}"
        add(f"{p}.attn_norm.weight", (n_embd,), T.F32, 0.1, 1.0)
        add(f"{p}.attn_q.weight", (qd, n_embd), qtype)
        add(f"{p}.attn_k.weight", (kd, n_embd), qtype)
        add(f"{p}.attn_v.weight", (kd, n_embd), qtype)
        add(f"{p}.attn_q_norm.weight", (head_dim,), T.F32, 0.1, 1.0)
        add(f"{p}.attn_k_norm.weight", (head_dim,), T.F32, 0.1, 1.0)
        add(f"{p}.attn_output.weight", (n_embd, qd), qtype)
        add(f"{p}.post_attention_norm.weight", (n_embd,), T.F32, 0.1, 1.0)
        add(f"{p}.ffn_norm.weight", (n_embd,), T.F32, 0.1, 1.0)
        add(f"{p}.ffn_gate.weight", (n_ff, n_embd), qtype)
        add(f"{p}.ffn_up.weight", (n_ff, n_embd), qtype)
        add(f"{p}.ffn_down.weight", (n_embd, n_ff), qtype)
        add(f"{p}.post_ffw_norm.weight", (n_embd,), T.F32, 0.1, 1.0)
    add("output_norm.weight", (n_embd,), T.F32, 0.1, 1.0)
    _finish(w)
    return ArchModel(path, "gemma3", weights, hp)


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope_neox(x: np.ndarray, base: float) -> np.ndarray:
    """x [n, heads, d]: rotate (x[i], x[i + d/2]) by pos * base^(-2i/d)."""
    n, _, d = x.shape
    half = d // 2
    th = np.arange(n)[:, None] * base ** (-2.0 * np.arange(half) / d)[None, :]
    c, s = np.cos(th)[:, None, :], np.sin(th)[:, None, :]
    x0, x1 = x[..., :half], x[..., half:]
    return np.concatenate([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)


def _attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, window: int) -> np.ndarray:
    n, nh, d = q.shape
    g = nh // k.shape[1]
    t = np.arange(n)
    vis = t[None, :] <= t[:, None]
    if window:
        vis &= t[:, None] - t[None, :] < window
    out = np.zeros_like(q)
    for h in range(nh):
        s = q[:, h] @ k[:, h // g].T * scale
        s = np.where(vis, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[:, h] = (p / p.sum(-1, keepdims=True)) @ v[:, h // g]
    return out


def gemma3_reference(m: ArchModel, tokens: list[int]) -> np.ndarray:
    """Gemma 3 as HF's Gemma3ForCausalLM computes it (norm weights already 1 + w): logits [n, vocab]."""
    W = {k: v.astype(np.float64) for k, v in m.weights.items()}
    hp = m.hp
    n, d, eps = len(tokens), hp["head_dim"], hp["eps"]
    gelu = lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))  # noqa: E731
    x = W["token_embd.weight"][tokens] * np.sqrt(hp["n_embd"])
    for i in range(hp["n_layer"]):
        p = f"blk.{i}"
        local = (i + 1) % hp["pattern"] != 0     # HF: layer_types, sliding unless (i + 1) % pattern == 0
        base = 10000.0 if local else hp["rope_base"]
        h = _rms(x, W[f"{p}.attn_norm.weight"], eps)
        q = (h @ W[f"{p}.attn_q.weight"].T).reshape(n, hp["n_head"], d)
        k = (h @ W[f"{p}.attn_k.weight"].T).reshape(n, hp["n_head_kv"], d)
        v = (h @ W[f"{p}.attn_v.weight"].T).reshape(n, hp["n_head_kv"], d)
        q = _rope_neox(_rms(q, W[f"{p}.attn_q_norm.weight"], eps), base)
        k = _rope_neox(_rms(k, W[f"{p}.attn_k_norm.weight"], eps), base)
        a = _attend(q, k, v, d ** -0.5, hp["window"] if local else 0).reshape(n, -1)
        x = x + _rms(a @ W[f"{p}.attn_output.weight"].T, W[f"{p}.post_attention_norm.weight"], eps)
        h = _rms(x, W[f"{p}.ffn_norm.weight"], eps)
        f = gelu(h @ W[f"{p}.ffn_gate.weight"].T) * (h @ W[f"{p}.ffn_up.weight"].T)
        x = x + _rms(f @ W[f"{p}.ffn_down.weight"].T, W[f"{p}.post_ffw_norm.weight"], eps)
    logits = _rms(x, W["output_norm.weight"], eps) @ W["token_embd.weight"].T
    if hp["final_softcap"]:
        logits = hp["final_softcap"] * np.tanh(logits / hp["final_softcap"])
    return logits


def write_llama_like(path: Path, arch: str, qtype: T = T.F32, *, n_layer: int = 2, n_embd: int = 64, n_head: int = 4,
                     n_head_kv: int = 2, head_dim: int = 32, n_ff: int = 128, window: int = 0,
                     seed: int = 0) -> ArchModel:
    """qwen3 (QK-norm, head_dim apart from n_embd / n_head) or phi3 (fused attn_qkv and gate-up
    ffn_up, optional sliding window on every layer); both neox rope, tied output."""
    hp = dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim, n_ff=n_ff,
              eps=1e-6, rope_base=10000.0, window=window, qk_norm=arch == "qwen3")
    w = _writer(path, arch, hp)
    if window:
        w.add_sliding_window(window)
    weights: dict[str, np.ndarray] = {}
    add = _adder(w, np.random.default_rng(seed), weights)
    add("token_embd.weight", (hp["n_vocab"], n_embd), qtype, 0.5)
    qd, kd = n_head * head_dim, n_head_kv * head_dim
    for i in range(n_layer):
        p = f"blk.{i}"
        add(f"{p}.attn_norm.weight", (n_embd,), T.F32, 0.1, 1.0)
        if arch == "phi3":
            add(f"{p}.attn_qkv.weight", (qd + 2 * kd, n_embd), qtype)
            qkv = weights.pop(f"{p}.attn_qkv.weight")
            weights[f"{p}.attn_q.weight"], weights[f"{p}.attn_k.weight"], weights[f"{p}.attn_v.weight"] = (
                qkv[:qd], qkv[qd:qd + kd], qkv[qd + kd:])
        else:
            for n, rows in (("q", qd), ("k", kd), ("v", kd)):
                add(f"{p}.attn_{n}.weight", (rows, n_embd), qtype)
            add(f"{p}.attn_q_norm.weight", (head_dim,), T.F32, 0.1, 1.0)
            add(f"{p}.attn_k_norm.weight", (head_dim,), T.F32, 0.1, 1.0)
        add(f"{p}.attn_output.weight", (n_embd, qd), qtype)
        add(f"{p}.ffn_norm.weight", (n_embd,), T.F32, 0.1, 1.0)
        if arch == "phi3":
            add(f"{p}.ffn_up.weight", (2 * n_ff, n_embd), qtype)
            gu = weights.pop(f"{p}.ffn_up.weight")
            weights[f"{p}.ffn_gate.weight"], weights[f"{p}.ffn_up.weight"] = gu[:n_ff], gu[n_ff:]
        else:
            add(f"{p}.ffn_gate.weight", (n_ff, n_embd), qtype)
            add(f"{p}.ffn_up.weight", (n_ff, n_embd), qtype)
        add(f"{p}.ffn_down.weight", (n_embd, n_ff), qtype)
    add("output_norm.weight", (n_embd,), T.F32, 0.1, 1.0)
    _finish(w)
    return ArchModel(path, arch, weights, hp)


def llama_like_reference(m: ArchModel, tokens: list[int]) -> np.ndarray:
    """The llama block with neox rope, per-head QK-norm when hp['qk_norm'], the window on every layer."""
    W = {k: v.astype(np.float64) for k, v in m.weights.items()}
    hp = m.hp
    n, d, eps = len(tokens), hp["head_dim"], hp["eps"]
    x = W["token_embd.weight"][tokens]
    for i in range(hp["n_layer"]):
        p = f"blk.{i}"
        h = _rms(x, W[f"{p}.attn_norm.weight"], eps)
        q = (h @ W[f"{p}.attn_q.weight"].T).reshape(n, hp["n_head"], d)
        k = (h @ W[f"{p}.attn_k.weight"].T).reshape(n, hp["n_head_kv"], d)
        v = (h @ W[f"{p}.attn_v.weight"].T).reshape(n, hp["n_head_kv"], d)
        if hp["qk_norm"]:
            q, k = _rms(q, W[f"{p}.attn_q_norm.weight"], eps), _rms(k, W[f"{p}.attn_k_norm.weight"], eps)
        q, k = _rope_neox(q, hp["rope_base"]), _rope_neox(k, hp["rope_base"])
        x = x + _attend(q, k, v, d ** -0.5, hp["window"]).reshape(n, -1) @ W[f"{p}.attn_output.weight"].T
        h = _rms(x, W[f"{p}.ffn_norm.weight"], eps)
        g = h @ W[f"{p}.ffn_gate.weight"].T
        x = x + (g / (1 + np.exp(-g)) * (h @ W[f"{p}.ffn_up.weight"].T)) @ W[f"{p}.ffn_down.weight"].T
    return _rms(x, W["output_norm.weight"], eps) @ W["token_embd.weight"].T
