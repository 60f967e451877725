"""Synthetic vocabulary-only GGUFs for the tokenizer tests and scripts/make_tokenizer_fixture.py.

Both the fixture script (run under the llama-cpp-python reference env) and the tests use these
helpers, so the tests can rebuild exactly the files llama.cpp tokenized and compare ids.
Everything here is deterministic.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from gguf import GGUFReader, GGUFWriter

REAL_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "models", "SmolLM2-135M-Instruct.Q4_1.gguf")

# the least llama.cpp wants to load a llama vocab with vocab_only=True (tiny made-up sizes)
LLAMA_ARCH_U32 = {
    "llama.context_length": 2048,
    "llama.embedding_length": 64,
    "llama.block_count": 1,
    "llama.feed_forward_length": 128,
    "llama.attention.head_count": 4,
    "llama.attention.head_count_kv": 4,
    "llama.rope.dimension_count": 16,
}
LLAMA_ARCH_F32 = {"llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.rope.freq_base": 10000.0}

_STR_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")
_INT_ARRAYS = ("tokenizer.ggml.token_type",)
_FLOAT_ARRAYS = ("tokenizer.ggml.scores",)

# TokenType values of GGUF
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def read_metadata(path: str, prefixes: tuple[str, ...] = ("tokenizer.", "general.")) -> dict[str, Any]:
    """``{key: field.contents()}`` for the keys starting with one of ``prefixes``."""
    reader = GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith(prefixes)}


def write_vocab_gguf(path: str, md: Mapping[str, Any]) -> None:
    """A GGUF with llama hparams, the ``tokenizer.*`` keys of ``md`` and no tensors."""
    w = GGUFWriter(path, arch="llama")
    for k, v in LLAMA_ARCH_U32.items():
        w.add_uint32(k, v)
    for k, v in LLAMA_ARCH_F32.items():
        w.add_float32(k, v)
    for k in sorted(md):
        v = md[k]
        if not k.startswith("tokenizer."):
            continue
        if k in _STR_ARRAYS:
            w.add_array(k, [str(x) for x in v])
        elif k in _INT_ARRAYS:
            w.add_array(k, [int(x) for x in v])
        elif k in _FLOAT_ARRAYS:
            w.add_array(k, [float(x) for x in v])
        elif isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        else:
            raise TypeError(f"cannot write {k}={v!r}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def bpe_variant_metadata(real_md: Mapping[str, Any], pre: str) -> dict[str, Any]:
    """The real model's BPE vocabulary with another ``tokenizer.ggml.pre``; add_bos/add_space_prefix
    are left out so llama.cpp's per-pre defaults apply.

    SmolLM2's vocabulary has no multi-digit tokens, which would hide how each pre-tokenizer groups
    digits; so 2- and 3-digit tokens and ' '+digits tokens (with their merges, ranked last) are
    appended.
    """
    keep = ("tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "unknown_token_id",
            "padding_token_id")
    md: dict[str, Any] = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre}
    for k in keep:
        key = "tokenizer.ggml." + k
        if key in real_md:
            md[key] = list(real_md[key]) if isinstance(real_md[key], list) else real_md[key]
    tokens, types, merges = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"], md["tokenizer.ggml.merges"]
    have = set(tokens)
    digits = "0123456789"
    extra = [(a, b) for a in digits for b in digits]
    extra += [(a + b, c) for a in digits for b in digits for c in digits]
    extra += [("\u0120", a) for a in digits] + [("\u0120" + a, b) for a in digits for b in digits]
    for left, right in extra:
        if left + right not in have:
            have.add(left + right)
            tokens.append(left + right)
            types.append(NORMAL)
            merges.append(f"{left} {right}")
    return md


_SPM_WORDS = (
    "the of and to in is was for that on as with by he it at from his an were are which this be or "
    "had not but first one their its new after who they have her she two been other when there all "
    "during into school time may years more most only over city some world would where later up "
    "such used many can state about national out known university united then made Hello hello "
    "World don't can't it's I'm we're they've you'll café naïve über straße 中文 日本語 привет мир "
    "function return print import def class self None True False 123 2024 3.14 ing er ed ly tion"
).split()


def spm_vocab_metadata() -> dict[str, Any]:
    """A small SentencePiece-style vocabulary: <unk>, <s>, </s>, 256 byte tokens, a few control and
    user-defined tokens, single characters and ~400 word pieces with U+2581 for spaces."""
    tokens: list[str] = ["<unk>", "<s>", "</s>"]
    types: list[int] = [UNKNOWN, CONTROL, CONTROL]
    scores: list[float] = [0.0, 0.0, 0.0]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(BYTE)
        scores.append(0.0)
    for t, ty in (("<|im_start|>", CONTROL), ("<|im_end|>", CONTROL), ("<|sep|>", USER_DEFINED)):
        tokens.append(t)
        types.append(ty)
        scores.append(0.0)
    pieces: list[str] = []
    seen = set(tokens)

    def add(p: str) -> None:
        if p and p not in seen:
            seen.add(p)
            pieces.append(p)

    for c in "\u2581" + "".join(chr(c) for c in range(0x21, 0x7F)) + "éïüßа中文日本語привемтрий":
        add(c)
    for w in _SPM_WORDS:
        if not w:
            continue
        word = "\u2581" + w.replace(" ", "\u2581")
        for i in range(2, len(word) + 1):  # every prefix, so each piece can be reached by merges
            add(word[:i])
        for i in range(2, len(w) + 1):  # and the word without the space
            add(w[:i])
    add("\u2581\u2581")
    add("\u2581\u2581\u2581\u2581")
    for i, p in enumerate(pieces):
        tokens.append(p)
        types.append(NORMAL)
        # groups of three pieces share a score, so ties (leftmost merge first) are exercised
        scores.append(-float(i // 3) / 4.0)
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }
