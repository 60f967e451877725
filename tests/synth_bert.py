"""Synthetic bert GGUFs (random weights, a small WordPiece vocabulary with GGUF's ``▁`` word
starts) and a plain float64 numpy forward of a BERT encoder written from its description
(embeddings + LayerNorm, post-norm layers, tanh GELU), not from the engine's graph."""
from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from synth_arch import ArchModel, _adder, _finish

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "cat", "cats", "dog", "sat", "on", "mat", "hello", "world", "play", "a", "b", "c", "x", "y", "z",
         "中", "文", ".", ",", "!", "?", "'"]
PIECES = ["ing", "s", "ed", "a", "b", "c", "x", "y", "z"]


def bert_vocab() -> tuple[list[str], list[int]]:
    tokens = SPECIALS + ["\u2581" + w for w in WORDS] + PIECES
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types


def write_bert(path: Path, qtype: T = T.F32, *, n_layer: int = 2, n_embd: int = 64, n_head: int = 4, n_ff: int = 128,
               n_pos: int = 64, pooling: int = 2, token_types: bool = True, cls: bool = False, cls_out: int = 0,
               add_sep: bool | None = None, seed: int = 0) -> ArchModel:
    """`pooling` is written as bert.pooling_type; `cls` adds cls.weight/bias [n_embd, n_embd] and
    `cls_out` > 0 cls.output.weight/bias [cls_out, n_embd] (a reranker's two-layer head)."""
    rng = np.random.default_rng(seed)
    tokens, types = bert_vocab()
    hp = dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_ff=n_ff, n_pos=n_pos, eps=1e-12, n_vocab=len(tokens),
              token_types=token_types)
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_block_count(n_layer)
    w.add_context_length(n_pos)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_layer_norm_eps(1e-12)
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType(pooling))
    w.add_token_type_count(2)
    w.add_tokenizer_model("bert")
    w.add_token_list(tokens)
    w.add_token_types(types)
    for key, name in (("cls_token_id", "[CLS]"), ("seperator_token_id", "[SEP]"), ("unknown_token_id", "[UNK]"),
                      ("padding_token_id", "[PAD]"), ("mask_token_id", "[MASK]")):
        w.add_uint32(f"tokenizer.ggml.{key}", tokens.index(name))
    if add_sep is not None:
        w.add_bool("tokenizer.ggml.add_sep_token", add_sep)
    weights: dict[str, np.ndarray] = {}
    add = _adder(w, rng, weights)
    add("token_embd.weight", (len(tokens), n_embd), qtype, 1.0)
    add("position_embd.weight", (n_pos, n_embd), T.F16, 0.5)
    if token_types:
        add("token_types.weight", (2, n_embd), T.F32, 0.5)
    add("token_embd_norm.weight", (n_embd,), T.F32, shift=1.0)
    add("token_embd_norm.bias", (n_embd,), T.F32)
    for i in range(n_layer):
        p = f"blk.{i}"
        for name, shape in (("attn_q", (n_embd, n_embd)), ("attn_k", (n_embd, n_embd)), ("attn_v", (n_embd, n_embd)),
                            ("attn_output", (n_embd, n_embd)), ("ffn_up", (n_ff, n_embd)), ("ffn_down", (n_embd, n_ff))):
            add(f"{p}.{name}.weight", shape, qtype)
            add(f"{p}.{name}.bias", (shape[0],), T.F32)
        for name in ("attn_output_norm", "layer_output_norm"):
            add(f"{p}.{name}.weight", (n_embd,), T.F32, shift=1.0)
            add(f"{p}.{name}.bias", (n_embd,), T.F32)
    if cls:
        add("cls.weight", (n_embd, n_embd), T.F32, 0.5)
        add("cls.bias", (n_embd,), T.F32)
    if cls_out:
        add("cls.output.weight", (cls_out, n_embd), T.F32, 0.5)
        add("cls.output.bias", (cls_out,), T.F32)
    _finish(w)
    return ArchModel(path, "bert", weights, hp)


def _ln(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def bert_reference(m: ArchModel, tokens: list[int]) -> np.ndarray:
    """The encoder's last rows [n, n_embd] for one input (every token sees every token)."""
    W = {k: v.astype(np.float64) for k, v in m.weights.items()}
    hp = m.hp
    n, h = len(tokens), hp["n_head"]
    d = hp["n_embd"] // h
    x = W["token_embd.weight"][tokens] + W["position_embd.weight"][:n]
    if hp["token_types"]:
        x = x + W["token_types.weight"][0]
    x = _ln(x, W["token_embd_norm.weight"], W["token_embd_norm.bias"], hp["eps"])

    def lin(v: np.ndarray, name: str) -> np.ndarray:
        return v @ W[f"{name}.weight"].T + W[f"{name}.bias"]

    for i in range(hp["n_layer"]):
        p = f"blk.{i}"
        q, k, v = (lin(x, f"{p}.attn_{c}").reshape(n, h, d).transpose(1, 0, 2) for c in "qkv")
        s = q @ k.transpose(0, 2, 1) / math.sqrt(d)
        s = np.exp(s - s.max(-1, keepdims=True))
        a = ((s / s.sum(-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(n, h * d)
        x = _ln(lin(a, f"{p}.attn_output") + x, W[f"{p}.attn_output_norm.weight"], W[f"{p}.attn_output_norm.bias"],
                hp["eps"])
        f = lin(_gelu(lin(x, f"{p}.ffn_up")), f"{p}.ffn_down")
        x = _ln(f + x, W[f"{p}.layer_output_norm.weight"], W[f"{p}.layer_output_norm.bias"], hp["eps"])
    return x


def rank_reference(m: ArchModel, tokens: list[int]) -> np.ndarray:
    """llama.cpp's rank head on the CLS row: tanh(cls x + b) (when cls.weight), then cls.output."""
    W = {k: v.astype(np.float64) for k, v in m.weights.items()}
    x = bert_reference(m, tokens)[0]
    if "cls.weight" in W:
        x = np.tanh(W["cls.weight"] @ x + W["cls.bias"])
    if "cls.output.weight" in W:
        x = W["cls.output.weight"] @ x + W["cls.output.bias"]
    return x


def write_nomic_bert(path: Path, qtype: T = T.F32, *, n_layer: int = 2, n_embd: int = 64, n_head: int = 4,
                     n_ff: int = 96, rope_base: float = 1000.0, pooling: int = 1, seed: int = 0) -> ArchModel:
    """nomic-bert: no position_embd (neox rope of Q/K), fused attn_qkv, SwiGLU FFN, no projection
    biases; LayerNorms with biases."""
    rng = np.random.default_rng(seed)
    tokens, types = bert_vocab()
    hp = dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_ff=n_ff, eps=1e-12, rope_base=rope_base,
              n_vocab=len(tokens))
    w = gguf.GGUFWriter(str(path), "nomic-bert")
    w.add_block_count(n_layer)
    w.add_context_length(128)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_layer_norm_eps(1e-12)
    w.add_causal_attention(False)
    w.add_rope_freq_base(rope_base)
    w.add_pooling_type(gguf.PoolingType(pooling))
    w.add_tokenizer_model("bert")
    w.add_token_list(tokens)
    w.add_token_types(types)
    for key, name in (("cls_token_id", "[CLS]"), ("seperator_token_id", "[SEP]"), ("unknown_token_id", "[UNK]")):
        w.add_uint32(f"tokenizer.ggml.{key}", tokens.index(name))
    weights: dict[str, np.ndarray] = {}
    add = _adder(w, rng, weights)
    add("token_embd.weight", (len(tokens), n_embd), qtype, 1.0)
    add("token_types.weight", (2, n_embd), T.F32, 0.5)
    add("token_embd_norm.weight", (n_embd,), T.F32, shift=1.0)
    add("token_embd_norm.bias", (n_embd,), T.F32)
    for i in range(n_layer):
        p = f"blk.{i}"
        for name, shape in (("attn_qkv", (3 * n_embd, n_embd)), ("attn_output", (n_embd, n_embd)),
                            ("ffn_gate", (n_ff, n_embd)), ("ffn_up", (n_ff, n_embd)), ("ffn_down", (n_embd, n_ff))):
            add(f"{p}.{name}.weight", shape, qtype)
        for name in ("attn_output_norm", "layer_output_norm"):
            add(f"{p}.{name}.weight", (n_embd,), T.F32, shift=1.0)
            add(f"{p}.{name}.bias", (n_embd,), T.F32)
    _finish(w)
    return ArchModel(path, "nomic-bert", weights, hp)


def _rope_neox(x: np.ndarray, base: float) -> np.ndarray:
    """x [n, h, d] rotated by position (0..n-1): pairs (i, i + d/2), theta = pos * base^(-2i/d)."""
    n, _, d = x.shape
    theta = np.arange(n)[:, None] * base ** (-2.0 * np.arange(d // 2) / d)
    c, s = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    x0, x1 = x[..., :d // 2], x[..., d // 2:]
    return np.concatenate([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)


def nomic_bert_reference(m: ArchModel, tokens: list[int]) -> np.ndarray:
    W = {k: v.astype(np.float64) for k, v in m.weights.items()}
    hp = m.hp
    n, h, e = len(tokens), hp["n_head"], hp["n_embd"]
    d = e // h
    x = _ln(W["token_embd.weight"][tokens] + W["token_types.weight"][0], W["token_embd_norm.weight"],
            W["token_embd_norm.bias"], hp["eps"])
    for i in range(hp["n_layer"]):
        p = f"blk.{i}"
        qkv = x @ W[f"{p}.attn_qkv.weight"].T
        q, k, v = (qkv[:, j * e:(j + 1) * e].reshape(n, h, d) for j in range(3))
        q, k = _rope_neox(q, hp["rope_base"]), _rope_neox(k, hp["rope_base"])
        s = np.einsum("thd,uhd->htu", q, k) / math.sqrt(d)
        s = np.exp(s - s.max(-1, keepdims=True))
        a = np.einsum("htu,uhd->thd", s / s.sum(-1, keepdims=True), v).reshape(n, e)
        x = _ln(a @ W[f"{p}.attn_output.weight"].T + x, W[f"{p}.attn_output_norm.weight"],
                W[f"{p}.attn_output_norm.bias"], hp["eps"])
        g = x @ W[f"{p}.ffn_gate.weight"].T
        f = (g / (1 + np.exp(-g)) * (x @ W[f"{p}.ffn_up.weight"].T)) @ W[f"{p}.ffn_down.weight"].T
        x = _ln(f + x, W[f"{p}.layer_output_norm.weight"], W[f"{p}.layer_output_norm.bias"], hp["eps"])
    return x
