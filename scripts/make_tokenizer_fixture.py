#!/usr/bin/env python3
"""Write tests/fixtures/tokenizer_<name>.json: llama.cpp's own tokenization of a fixed set of
strings, for the tokenizer tests to compare against.

Run it with a Python that has llama-cpp-python and gguf installed (not the project's env):

    /path/to/refenv/bin/python scripts/make_tokenizer_fixture.py

llama.cpp is reached through llama-cpp-python's low-level API with ``vocab_only=True``. Fixtures:

* ``smollm``     - the real models/SmolLM2-135M-Instruct.Q4_1.gguf (pre ``smollm``)
* ``gpt-2``, ``llama-bpe``, ``qwen2`` - the same vocabulary written into synthetic GGUFs with that
  ``tokenizer.ggml.pre`` (tests/gguf_vocab.py), so each pre-tokenizer regex set is checked
* ``spm``        - a small synthetic SentencePiece vocabulary (tests/gguf_vocab.py)

Each fixture records, per string: the ids with parse_special on and off, llama_detokenize's
output, plus the model's BOS/EOS/EOT, add_bos/add_eos, the end-of-generation ids, the non-normal
token attributes and a hash of every token's piece; for the first 25 strings also the ids
with add_special and their llama_detokenize(remove_special=True, unparse_special=False).
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import logging
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import gguf_vocab  # noqa: E402  (tests/gguf_vocab.py)

log = logging.getLogger("make_tokenizer_fixture")

PARAGRAPH = (
    "In 1879, the Great Exhibition's halls held 12,345 visitors a day; by 2024 the museum's "
    "archive listed 987654321 objects. \"It's remarkable,\" said Dr. O'Neil — who'd catalogued "
    "the café's naïve façade — \"we've never seen anything like it!\" Prices rose 3.5% (from "
    "$1,299.99 to €1.345,50) while the 東京 branch reported ¥150000. Meanwhile, the résumé of "
    "Zoë Ångström listed: Python, C++, and Rust.\n\n\tNew paragraph:   spaces,\ttabs,\r\nand "
    "CRLF line endings… emoji 😀👍🏽👨‍👩‍👧 and math ∑∫√∞ ≠ ≤ ≥. Привет! Γειά! مرحبا! שלום! "
    "नमस्ते! สวัสดี! 안녕하세요! The end."
)

BASE_STRINGS = [
    # empty / whitespace
    "", " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n", "\n ", "\t\t", " \t\n ", "\r", "\n\n\n ",
    " " * 50, "\n" * 20, "\t" * 9, "a" + " " * 17 + "b", "a \n b", "a\n\nb", "  \n  \n",
    # plain words
    "Hello world", "Hello, world!", " Hello", "  Hello", "Hello ", "Hello  ", "hello   world",
    "The quick brown fox jumps over the lazy dog.", "HELLO WORLD", "hElLo", "CamelCaseIdentifier",
    "snake_case_identifier", "kebab-case-id", "a", "I", "x y z", "Mr. Smith went to Washington.",
    # contractions
    "don't", "I'm", "you're", "we've", "he'll", "she'd", "it's", "It'S", "DON'T", "I'M", "YOU'RE",
    "'s", "'t", "'re", "'ll", " 's", "'", "''", "rock 'n' roll", "O'Neil's", "'hello'", "\"quoted\"",
    "it ' s", "Hello ?", "Hello !", "a , b . c", "they 've", "we 're", "I 'm",
    # numbers
    "3.14159", "1,000,000", "-42", "+7", "0x1F", "1e-5", "x1y22z333", "２０２４", "١٢٣", "½ ² ³",
    "Ⅻ", "①②③", "𝟘𝟙𝟚", "v1.2.3", "2024-01-15T10:30:00Z", "$1,299.99", "100%",
    # scripts
    "café", "naïve", "Straße", "Привет, мир!", "Γειά σου Κόσμε", "你好，世界", "こんにちは世界",
    "안녕하세요", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก", "Tiếng Việt có dấu",
    "e\u0301", "Z\u0351\u0300a\u0316l\u0301g\u0315o", "ﬁ ligature", "ﾊﾝｶｸ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "ÀÉÎÕÜ",
    "Ελληνικά και English", "日本語とEnglishの混在", "ქართული", "Հայերեն", "ᚠᛇᚻ",
    # emoji
    "😀", "😀😃😄", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇺🇸🇬🇧", "❤️", "I ❤️ NY", "1️⃣", "🧑🏿‍💻 coding",
    "✨🎉", "a😀b", " 😀 ", "😀\n😀",
    # odd whitespace and controls
    "\u00a0", "a\u00a0b", "\u3000", "a\u2003b", "\u200b", "a\u2028b", "a\u0085b", "\x0b\x0c",
    "a\x00b", "\x1f", "\x7f", "a\u200db", "\ufeffBOM",
    # code
    "def foo(x):\n    return x * 2\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    "<div class=\"x\">&amp;</div>", "SELECT * FROM t WHERE id = 1;", "#include <stdio.h>",
    "x = [1, 2, 3]  # comment", "    indented\n        more\n", "https://example.com/path?q=1&r=2",
    "user@example.com", "C:\\Windows\\System32", "{\"a\": 1, \"b\": [true, null]}", "λx. x + 1",
    "a→b ⇒ c ≠ d ≤ e", "$100 + 5% = ~€105", "~~~", "```python\nprint('hi')\n```", "!!!???...",
    "...", "--", "----", "___init___", "if x:\n\tpass\n\nelse:\n\t\tpass", "a  =  b", "foo()\n\n\n",
    "// comment\r\n/* block */", "<<>>", "</", "<|", "|>",
    # special tokens in text
    "<|im_start|>", "<|im_end|>", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>more", "<|im_start|><|im_end|>", "<|im_start |>", "<|im_start", "<|endoftext|>",
    "a <|endoftext|> b", " <|im_start|> ", "<|im_start|>system\nYou are helpful.<|im_end|>",
    "<s>", "</s>", "<unk>", "<s>Hello</s>", "<|sep|>", "x<|sep|>y", " <|sep|> ", "<reponame>",
    "<filename>main.py", "<|im_end|><|im_end|>", "<<|im_start|>>", "<|im_start|>\n\n",
    "Hello<|im_end|>", "<|im_start|> Hello", "<|im_start|>  Hello",
    # long
    PARAGRAPH,
]


def _generated() -> list[str]:
    out = []
    for n in range(1, 31):
        digits = "".join(str((i * 7 + 3) % 10) for i in range(n))
        out.append(digits)
        if n % 3 == 0:
            out.append(" " + digits)
            out.append("abc" + digits + "def")
    for n in range(1, 9):
        out += [" " * n + "x", "x" + " " * n, "x" + " " * n + "y", "\n" * n + "x", " \n" * n, "\t" * n + "x"]
    return out


def all_strings() -> list[str]:
    seen: set[str] = set()
    out = []
    for s in BASE_STRINGS + _generated():
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


class Vocab:
    """llama.cpp's vocabulary of one GGUF, through llama-cpp-python's C bindings."""

    def __init__(self, path: str) -> None:
        import llama_cpp

        self.lc = llama_cpp
        self.llm = llama_cpp.Llama(path, vocab_only=True, verbose=False)
        self.vocab = self.llm._model.vocab
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (self.lc.llama_token * n_max)()
        n = self.lc.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            raise RuntimeError(f"llama_tokenize needs {-n} tokens for {text!r}")
        return list(buf[:n])

    def detokenize(self, ids: list[int], remove_special: bool, unparse_special: bool) -> bytes:
        arr = (self.lc.llama_token * max(1, len(ids)))(*ids)
        size = 64 + 64 * len(ids)
        out = ctypes.create_string_buffer(size)
        n = self.lc.llama_detokenize(self.vocab, arr, len(ids), out, size, remove_special, unparse_special)
        if n < 0:
            raise RuntimeError("detokenize buffer too small")
        return out.raw[:n]

    def piece(self, tid: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(512)
        n = self.lc.llama_token_to_piece(self.vocab, tid, buf, 512, 0, special)
        if n < 0:
            raise RuntimeError(f"piece of {tid} longer than 512 bytes")
        return buf.raw[:n]

    def _tok(self, fn) -> int | None:
        t = fn(self.vocab)
        return None if t < 0 else int(t)

    def summary(self) -> dict:
        lc, v = self.lc, self.vocab
        digests = {}
        for special in (True, False):
            h = hashlib.sha256()
            for tid in range(self.n_vocab):
                p = self.piece(tid, special)
                h.update(len(p).to_bytes(4, "little") + p)
            digests["special" if special else "plain"] = h.hexdigest()
        attrs = []
        for tid in range(self.n_vocab):
            a = int(lc.llama_vocab_get_attr(v, tid))
            if a != 4:  # LLAMA_TOKEN_ATTR_NORMAL
                attrs.append([tid, a])
        return {
            "n_vocab": self.n_vocab,
            "bos": self._tok(lc.llama_vocab_bos), "eos": self._tok(lc.llama_vocab_eos),
            "eot": self._tok(lc.llama_vocab_eot),
            "add_bos": bool(lc.llama_vocab_get_add_bos(v)), "add_eos": bool(lc.llama_vocab_get_add_eos(v)),
            "eog_ids": [t for t in range(self.n_vocab) if lc.llama_vocab_is_eog(v, t)],
            "attrs": attrs,
            "pieces_sha256": digests,
        }


def make_fixture(name: str, path: str, source: str) -> dict:
    import llama_cpp

    v = Vocab(path)
    cases = []
    for i, s in enumerate(all_strings()):
        case: dict = {"text": s, "ids": v.tokenize(s, False, True)}
        plain = v.tokenize(s, False, False)
        if plain != case["ids"]:
            case["ids_plain"] = plain
        if i < 25:
            case["ids_add_special"] = v.tokenize(s, True, True)
            skip = v.detokenize(case["ids_add_special"], True, False)
            if skip != s.encode("utf-8"):
                case["detok_skip_hex"] = skip.hex()
        detok = v.detokenize(case["ids"], False, True)
        if detok != s.encode("utf-8"):
            case["detok_hex"] = detok.hex()
        cases.append(case)
    fixture = {
        "name": name,
        "source": source,
        "generator": "scripts/make_tokenizer_fixture.py (llama.cpp via llama-cpp-python "
                     f"{llama_cpp.__version__}, vocab_only=True)",
        **v.summary(),
        "cases": cases,
    }
    return fixture


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=gguf_vocab.REAL_MODEL, help="the real SmolLM2 GGUF")
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures"))
    ap.add_argument("--only", nargs="*", help="fixture names to make (default: all)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    want = set(args.only) if args.only else None
    jobs: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        if os.path.exists(args.model):
            jobs.append(("smollm", args.model, "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
            real = gguf_vocab.read_metadata(args.model)
            for pre in ("gpt-2", "llama-bpe", "qwen2"):
                p = os.path.join(tmp, f"{pre}.gguf")
                gguf_vocab.write_vocab_gguf(p, gguf_vocab.bpe_variant_metadata(real, pre))
                jobs.append((pre, p, f"gguf_vocab.bpe_variant_metadata(SmolLM2, {pre!r})"))
        else:
            log.warning("%s not found: skipping the BPE fixtures", args.model)
        p = os.path.join(tmp, "spm.gguf")
        gguf_vocab.write_vocab_gguf(p, gguf_vocab.spm_vocab_metadata())
        jobs.append(("spm", p, "gguf_vocab.spm_vocab_metadata()"))
        for name, path, source in jobs:
            if want is not None and name not in want:
                continue
            fx = make_fixture(name, path, source)
            out = os.path.join(args.out, f"tokenizer_{name}.json")
            with open(out, "w", encoding="utf-8") as f:
                json.dump(fx, f, ensure_ascii=False, separators=(",", ":"))
                f.write("\n")
            log.info("%s: %d strings, %d bytes", out, len(fx["cases"]), os.path.getsize(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
