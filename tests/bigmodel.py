"""A llama-architecture GGUF of tens of MB whose matrices are random Q4_0 blocks, written fast.

    info = write_big_q4_0_model(path, n_layer=8, n_embd=1024, n_ff=2816, n_head=16, n_head_kv=4, seed=0)
    info.tensor_bytes      # bytes of all tensor data in the file
    info.matrix_elements   # elements of every 2-d (Q4_0) tensor: 4 * this is what float32 copies take

The Q4_0 blocks are random bytes (nibbles uniform over 0..15) with small f16 scales of random sign
(|d| ~ 0.02/8), so weights are ~N(0, 0.012) and activations stay sane; nothing is quantized with
gguf.quants (too slow at this size). token_embd (scales 25x larger) and an untied output.weight are
Q4_0 as well, norms are F32 ones, and the tokenizer is tests/synth.py's byte vocabulary with
SmolLM2-like BPE metadata.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from synth import add_llama_hparams, byte_vocab

Q4_0_BLOCK, Q4_0_BYTES = GGML_QUANT_SIZES[T.Q4_0]   # 32 weights in 18 bytes: f16 scale + 16 nibble bytes
SCALE = 0.02 / 8
EMBD_SCALE = 0.5 / 8


@dataclasses.dataclass(frozen=True)
class BigModel:
    path: Path
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    tensor_bytes: int      # all tensor data, as stored
    matrix_elements: int   # elements of the 2-d tensors (all Q4_0)


def random_q4_0(rng: np.random.Generator, rows: int, cols: int, scale: float = SCALE) -> np.ndarray:
    """Stored bytes [rows, cols / 32 * 18] of a random Q4_0 matrix of `rows` x `cols` weights, whose
    block scales have random sign and magnitude in [0.5, 1.5] x `scale`."""
    if cols % Q4_0_BLOCK:
        raise ValueError(f"Q4_0 rows need a multiple of {Q4_0_BLOCK} columns, got {cols}")
    nb = rows * cols // Q4_0_BLOCK
    raw = np.frombuffer(rng.bytes(nb * Q4_0_BYTES), dtype=np.uint8).reshape(nb, Q4_0_BYTES).copy()
    d = (rng.uniform(0.5, 1.5, nb) * scale * rng.choice(np.array([-1.0, 1.0]), nb)).astype(np.float16)
    raw[:, :2] = d.view(np.uint8).reshape(nb, 2)
    return raw.reshape(rows, cols // Q4_0_BLOCK * Q4_0_BYTES)


def write_big_q4_0_model(path: Path | str, *, n_layer: int, n_embd: int, n_ff: int, n_head: int, n_head_kv: int,
                         seed: int = 0, n_ctx_train: int = 2048) -> BigModel:
    path = Path(path)
    rng = np.random.default_rng(seed)
    tokens, types, merges = byte_vocab()
    n_vocab = len(tokens)
    hd = n_embd // n_head
    kv_dim = n_head_kv * hd
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("bigmodel-q4_0")
    add_llama_hparams(w, n_layer=n_layer, n_ctx=n_ctx_train, n_embd=n_embd, n_ff=n_ff, n_head=n_head,
                      n_head_kv=n_head_kv, rot=hd)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    # SmolLM2-like: gpt2 BPE with the smollm pre-tokenizer, <|im_start|> bos, <|im_end|> eos, no bos added
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    tensor_bytes = 0
    matrix_elements = 0

    def matrix(name: str, rows: int, cols: int, scale: float = SCALE) -> None:
        nonlocal tensor_bytes, matrix_elements
        stored = random_q4_0(rng, rows, cols, scale)
        w.add_tensor(name, stored, raw_shape=stored.shape, raw_dtype=T.Q4_0)
        tensor_bytes += stored.nbytes
        matrix_elements += rows * cols

    def norm(name: str) -> None:
        nonlocal tensor_bytes
        ones = np.ones(n_embd, dtype=np.float32)
        w.add_tensor(name, ones)
        tensor_bytes += ones.nbytes

    # larger embeddings and an untied output: with tied small ones greedy decoding repeats one token
    matrix("token_embd.weight", n_vocab, n_embd, EMBD_SCALE)
    for i in range(n_layer):
        p = f"blk.{i}"
        norm(f"{p}.attn_norm.weight")
        matrix(f"{p}.attn_q.weight", n_embd, n_embd)
        matrix(f"{p}.attn_k.weight", kv_dim, n_embd)
        matrix(f"{p}.attn_v.weight", kv_dim, n_embd)
        matrix(f"{p}.attn_output.weight", n_embd, n_embd)
        norm(f"{p}.ffn_norm.weight")
        matrix(f"{p}.ffn_gate.weight", n_ff, n_embd)
        matrix(f"{p}.ffn_up.weight", n_ff, n_embd)
        matrix(f"{p}.ffn_down.weight", n_embd, n_ff)
    norm("output_norm.weight")
    matrix("output.weight", n_vocab, n_embd)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return BigModel(path, n_layer, n_embd, n_ff, n_head, n_head_kv, n_vocab, tensor_bytes, matrix_elements)
