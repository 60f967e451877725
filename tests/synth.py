"""Tiny synthetic GGUF models written with gguf.GGUFWriter (random weights), and a plain numpy
reference forward to check the engine against. Nothing here is downloaded."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize
from llamarpc.frontend.model.tokenizer_bpe import BYTE_TO_CHAR

# Types gguf-py can quantize to (we write real quantized data) ...
QUANTIZABLE = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
# ... and the k-quants it can only dequantize: we write random blocks with sane f16 scales.
KQUANTS = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
_KQ_SCALE_OFFSETS = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def byte_vocab() -> tuple[list[str], list[int], list[str]]:
    """A gpt2-style byte-level vocabulary: 3 specials, 256 bytes, a few merges."""
    b2u = BYTE_TO_CHAR
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [b2u[b] for b in range(256)]
    types = [3, 3, 3] + [1] * 256
    merges = []
    for a, b in [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "t"), ("o", "r")]:
        merges.append(f"{a} {b}")
        tokens.append(a + b)
        types.append(1)
    return tokens, types, merges


def make_weight(rng: np.random.Generator, shape: tuple[int, ...], qtype: T, scale: float = 0.2) -> np.ndarray:
    """Stored bytes (or plain array) of a random weight of numpy `shape` in `qtype`."""
    if qtype in KQUANTS:
        block, size = GGML_QUANT_SIZES[qtype]
        rows = int(np.prod(shape[:-1]))
        nb = rows * shape[-1] // block
        raw = rng.integers(0, 256, size=(nb, size), dtype=np.uint8)
        for off in _KQ_SCALE_OFFSETS[qtype]:
            raw[:, off:off + 2] = np.frombuffer(np.float16(scale / 400).tobytes(), dtype=np.uint8)
        return raw.reshape(*shape[:-1], shape[-1] // block * size)
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    if qtype == T.F32:
        return x
    return quantize(x, qtype)


def to_float(stored: np.ndarray, qtype: T, shape: tuple[int, ...]) -> np.ndarray:
    if qtype == T.F32:
        return stored.astype(np.float32)
    if qtype == T.F16:
        return stored.astype(np.float32)
    return dequantize(stored, qtype).reshape(shape).astype(np.float32)


@dataclasses.dataclass
class SynthModel:
    path: Path
    arch: str
    weights: dict[str, np.ndarray]   # float32, as the engine should see them
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    rope_base: float
    eps: float
    qkv_bias: bool
    n_vocab: int


def add_llama_hparams(w: gguf.GGUFWriter, *, n_layer: int, n_ctx: int, n_embd: int, n_ff: int, n_head: int,
                      n_head_kv: int, rot: int, eps: float = 1e-5, rope_base: float = 10000.0) -> None:
    """The hyper-parameter keys of a llama-style GGUF (the architecture's prefix is the writer's)."""
    w.add_block_count(n_layer)
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(eps)
    w.add_rope_freq_base(rope_base)
    w.add_rope_dimension_count(rot)


def add_byte_tokenizer(w: gguf.GGUFWriter, tokens: list[str], types: list[int], merges: list[str]) -> None:
    """The byte-level BPE vocabulary of `byte_vocab` as GGUF tokenizer metadata (BOS 0, EOS 2)."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)


def write_model(path: Path, arch: str = "llama", qtype: T = T.F32, *, n_layer: int = 2, n_embd: int = 256,
                n_head: int = 4, n_head_kv: int = 2, n_ff: int = 512, seed: int = 0, tied: bool = True,
                skip_tensor: str | None = None, cls_out: int = 0, fim: bool = False,
                replace: dict[str, np.ndarray] | None = None, chat_template: str | None = None) -> SynthModel:
    """`cls_out` > 0 adds a classification head (cls.output.weight [cls_out, n_embd] and its bias, a
    reranker's); `fim` adds FIM tokens (<|fim_prefix|> ... <|file_sep|>, the first three by id keys).
    `replace` swaps named F32 tensors for the given values (the random ones are drawn all the same,
    so the other tensors are as without it: a merged-LoRA model); `chat_template` is written as
    tokenizer.chat_template."""
    rng = np.random.default_rng(seed)
    tokens, types, merges = byte_vocab()
    if fim:
        tokens += list(FIM_TOKENS)
        types += [3] * len(FIM_TOKENS)
    n_vocab = len(tokens)
    hd = n_embd // n_head
    w = gguf.GGUFWriter(str(path), arch)
    add_llama_hparams(w, n_layer=n_layer, n_ctx=256, n_embd=n_embd, n_ff=n_ff, n_head=n_head, n_head_kv=n_head_kv, rot=hd)
    add_byte_tokenizer(w, tokens, types, merges)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    if fim:
        for key, text in (("fim_pre", "<|fim_prefix|>"), ("fim_suf", "<|fim_suffix|>"), ("fim_mid", "<|fim_middle|>")):
            w.add_uint32(f"tokenizer.ggml.{key}_token_id", tokens.index(text))
    weights: dict[str, np.ndarray] = {}

    def add(name: str, shape: tuple[int, ...], t: T, scale: float = 0.2, shift: float = 0.0) -> None:
        if name == skip_tensor:
            return
        stored = make_weight(rng, shape, t, scale)
        if shift:
            stored = stored + np.float32(shift)
        if replace and name in replace:
            stored = np.asarray(replace[name], np.float32).reshape(shape)
        weights[name] = to_float(stored, t, shape)
        if t in (T.F32, T.F16):
            w.add_tensor(name, stored)
        else:
            w.add_tensor(name, stored, raw_shape=stored.shape, raw_dtype=t)

    add("token_embd.weight", (n_vocab, n_embd), qtype, 1.0)
    for i in range(n_layer):
        p = f"blk.{i}"
        add(f"{p}.attn_norm.weight", (n_embd,), T.F32, shift=1.0)
        add(f"{p}.attn_q.weight", (n_embd, n_embd), qtype)
        add(f"{p}.attn_k.weight", (n_head_kv * hd, n_embd), qtype)
        add(f"{p}.attn_v.weight", (n_head_kv * hd, n_embd), qtype)
        if arch == "qwen2":
            for n, dim in (("q", n_embd), ("k", n_head_kv * hd), ("v", n_head_kv * hd)):
                add(f"{p}.attn_{n}.bias", (dim,), T.F32)
        add(f"{p}.attn_output.weight", (n_embd, n_embd), qtype)
        add(f"{p}.ffn_norm.weight", (n_embd,), T.F32, shift=1.0)
        add(f"{p}.ffn_gate.weight", (n_ff, n_embd), qtype)
        add(f"{p}.ffn_up.weight", (n_ff, n_embd), qtype)
        add(f"{p}.ffn_down.weight", (n_embd, n_ff), qtype)
    add("output_norm.weight", (n_embd,), T.F32, shift=1.0)
    if not tied:
        add("output.weight", (n_vocab, n_embd), qtype)
    if cls_out:
        add("cls.output.weight", (cls_out, n_embd), T.F32)
        add("cls.output.bias", (cls_out,), T.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return SynthModel(path, arch, weights, n_layer, n_embd, n_head, n_head_kv, n_ff, 10000.0, 1e-5,
                      arch == "qwen2", n_vocab)


FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|fim_repo|>", "<|file_sep|>")


def reference_hidden(m: SynthModel, tokens: list[int]) -> np.ndarray:
    """The final norm's rows [n, n_embd] (what embeddings pool): the reference with an identity output."""
    w = dict(m.weights)
    w["output.weight"] = np.eye(m.n_embd, dtype=np.float32)
    return reference_logits(dataclasses.replace(m, weights=w), tokens)


def reference_logits(m: SynthModel, tokens: list[int]) -> np.ndarray:
    """A plain float64 numpy forward over the whole sequence, no cache: logits [n, vocab]."""
    W = {k: v.astype(np.float64) for k, v in m.weights.items()}
    n = len(tokens)
    hd = m.n_embd // m.n_head
    g = m.n_head // m.n_head_kv
    neox = m.arch == "qwen2"

    def norm(x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + m.eps) * w

    def rope(x: np.ndarray) -> np.ndarray:  # x [n, heads, hd]
        out = x.copy()
        for t in range(n):
            for i in range(hd // 2):
                th = t * m.rope_base ** (-2 * i / hd)
                a, b = (i, i + hd // 2) if neox else (2 * i, 2 * i + 1)
                x0, x1 = x[t, :, a], x[t, :, b]
                out[t, :, a] = x0 * np.cos(th) - x1 * np.sin(th)
                out[t, :, b] = x0 * np.sin(th) + x1 * np.cos(th)
        return out

    x = W["token_embd.weight"][tokens]
    for i in range(m.n_layer):
        p = f"blk.{i}"
        h = norm(x, W[f"{p}.attn_norm.weight"])
        q, k, v = (h @ W[f"{p}.attn_{c}.weight"].T for c in "qkv")
        if m.qkv_bias:
            q, k, v = q + W[f"{p}.attn_q.bias"], k + W[f"{p}.attn_k.bias"], v + W[f"{p}.attn_v.bias"]
        q = rope(q.reshape(n, m.n_head, hd))
        k = rope(k.reshape(n, m.n_head_kv, hd))
        v = v.reshape(n, m.n_head_kv, hd)
        att = np.zeros((n, m.n_head, hd))
        for hh in range(m.n_head):
            s = q[:, hh] @ k[:, hh // g].T / np.sqrt(hd)
            s[np.triu(np.ones((n, n), bool), 1)] = -np.inf
            pr = np.exp(s - s.max(-1, keepdims=True))
            pr /= pr.sum(-1, keepdims=True)
            att[:, hh] = pr @ v[:, hh // g]
        x = x + att.reshape(n, -1) @ W[f"{p}.attn_output.weight"].T
        h = norm(x, W[f"{p}.ffn_norm.weight"])
        gt = h @ W[f"{p}.ffn_gate.weight"].T
        x = x + ((gt * 0.5 * (1 + np.tanh(gt / 2))) * (h @ W[f"{p}.ffn_up.weight"].T)) @ W[f"{p}.ffn_down.weight"].T
    x = norm(x, W["output_norm.weight"])
    out = W.get("output.weight", W["token_embd.weight"])
    return x @ out.T
