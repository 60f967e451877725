"""WordPiece ("bert" GGUF tokenizers), as llama.cpp's llm_tokenizer_wpm does it.

The text is NFD-normalized and lowercased; whitespace ends a word, control characters (and NUL,
U+FFFD) are dropped, and each punctuation character, ASCII symbol and CJK ideograph is a word of
its own. Each word, with the phantom space U+2581 in front (GGUF's bert vocabularies store
word-initial pieces as ``▁word`` and continuations bare, where HF's had ``word`` and ``##cont``),
is cut greedily into the longest vocabulary pieces from the left; a word with a part that matches
no piece becomes the unknown token as a whole.
"""
from __future__ import annotations

import unicodedata

SPACE = "\u2581"

_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
        (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))   # llama.cpp's is_chinese_char


def _is_cjk(cp: int) -> bool:
    return any(a <= cp <= b for a, b in _CJK)


def split_words(text: str) -> list[str]:
    """llm_tokenizer_wpm_session::preprocess: the lowercased words of the NFD text."""
    words: list[str] = []
    cur: list[str] = []
    for ch in unicodedata.normalize("NFD", text):
        if ch.isspace():
            if cur:
                words.append("".join(cur))
                cur = []
            continue
        cp = ord(ch)
        cat = unicodedata.category(ch)
        if cp == 0 or cp == 0xFFFD or cat[0] == "C":
            continue
        low = ch.lower()
        if cat[0] == "P" or (cp < 0x7F and cat[0] == "S") or _is_cjk(cp):
            if cur:
                words.append("".join(cur))
                cur = []
            words.append(low)
        else:
            cur.append(low)
    if cur:
        words.append("".join(cur))
    return words


class WordPiece:
    def __init__(self, token_to_id: dict[str, int], unk_id: int | None) -> None:
        self._t2i = token_to_id
        self._unk = unk_id
        self._max_len = max((len(t) for t in token_to_id), default=1)

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        t2i, max_len = self._t2i, self._max_len
        for word in split_words(text):
            w = SPACE + word
            n = len(w)
            start = len(out)
            i = 0
            while i < n:
                for j in range(min(n, i + max_len), i, -1):
                    tid = t2i.get(w[i:j])
                    if tid is not None:
                        out.append(tid)
                        i = j
                        break
                else:               # no piece matches here: the whole word is unknown
                    del out[start:]
                    break
            if len(out) == start and self._unk is not None:
                out.append(self._unk)
        return out
