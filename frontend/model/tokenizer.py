"""The GGUF tokenizer, behaving like llama.cpp's llama_vocab (src/llama-vocab.cpp).

``Tokenizer.from_metadata`` takes the GGUF key/values (plain Python values) and builds either a
byte-level BPE tokenizer (``tokenizer.ggml.model == "gpt2"``), a SentencePiece-style one
(``"llama"``) or WordPiece (``"bert"``: [CLS] ... [SEP] around the text as add_bos / add_sep
say). Special tokens are cut out of the text first (llama.cpp's ``tokenizer_st_partition``), the
pieces between them are tokenized, and token attributes, BOS/EOS defaults and the end-of-generation set follow llama.cpp's loader.
"""
from __future__ import annotations

import codecs
import logging
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from .tokenizer_bpe import ByteLevelBPE, byte_level_decode, resolve_pre
from .tokenizer_special import (
    ATTR_BYTE,
    ATTR_CONTROL,
    ATTR_LSTRIP,
    ATTR_NORMAL,
    ATTR_RSTRIP,
    ATTR_SPECIAL,
    ATTR_UNDEFINED,
    ATTR_UNKNOWN,
    ATTR_USER_DEFINED,
    TYPE_TO_ATTR,
    detect_specials,
)
from .tokenizer_spm import SPACE, SentencePieceBPE
from .tokenizer_wpm import WordPiece

logger = logging.getLogger(__name__)

_ID_KEYS = {  # our name -> GGUF key suffix (llama.cpp's LLM_KV_TOKENIZER_*_ID)
    "bos": "bos_token_id", "eos": "eos_token_id", "eot": "eot_token_id", "eom": "eom_token_id",
    "unk": "unknown_token_id", "sep": "seperator_token_id", "pad": "padding_token_id",
    "mask": "mask_token_id", "fim_pre": "fim_pre_token_id", "fim_suf": "fim_suf_token_id",
    "fim_mid": "fim_mid_token_id", "fim_pad": "fim_pad_token_id", "fim_rep": "fim_rep_token_id",
    "fim_sep": "fim_sep_token_id",
}
_DEPRECATED_ID_KEYS = {"fim_pre": "prefix_token_id", "fim_suf": "suffix_token_id", "fim_mid": "middle_token_id"}
_C_SPACE = " \t\n\v\f\r"  # C isspace()


def _key(md: Mapping[str, Any], name: str, kind: type, default: Any = None) -> Any:
    full = "tokenizer.ggml." + name
    val = md.get(full)
    if val is None:
        return default
    if kind is int and isinstance(val, numbers.Integral) and not isinstance(val, bool):
        return int(val)
    if kind is bool and isinstance(val, (bool, numbers.Integral)):
        return bool(val)
    if not isinstance(val, kind):
        raise ValueError(f"GGUF key {full} has a value of type {type(val).__name__}, "
                         f"expected {getattr(kind, '__name__', kind)}")
    return val


def _list_key(md: Mapping[str, Any], name: str, item: type | tuple[type, ...], n: int | None) -> list | None:
    full = "tokenizer.ggml." + name
    val = md.get(full)
    if val is None:
        return None
    if isinstance(val, (str, bytes)) or not isinstance(val, Sequence) and not hasattr(val, "tolist"):
        raise ValueError(f"GGUF key {full} must be an array, got {type(val).__name__}")
    val = val.tolist() if hasattr(val, "tolist") else list(val)
    if n is not None and len(val) < n:
        raise ValueError(f"GGUF key {full} has {len(val)} entries, fewer than the {n} tokens")
    kinds = set(map(type, val[: n or len(val)]))   # one C-level pass: the vocabulary is large
    allowed = item if isinstance(item, tuple) else (item,)
    if val and (bool in kinds or not all(issubclass(k, allowed) for k in kinds)):
        raise ValueError(f"GGUF key {full} must be an array of {getattr(item, '__name__', item)}")
    return val


class StreamDecoder:
    """Turns generated token ids into text as they come; holds back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False) -> None:
        self._tok = tokenizer
        self._special = not skip_special
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._dec.decode(self._tok.token_to_piece(token_id, special=self._special))

    def flush(self) -> str:
        """The text still held back (a cut-off sequence becomes U+FFFD); the decoder is reset."""
        out = self._dec.decode(b"", final=True)
        self._dec.reset()
        return out


class Tokenizer:
    """A GGUF vocabulary: encode/decode like llama.cpp. Build with :meth:`from_metadata`."""

    def __init__(self, md: Mapping[str, Any]) -> None:
        model = _key(md, "model", str)
        if model is None:
            raise ValueError("GGUF has no tokenizer.ggml.model key")
        if model not in ("gpt2", "llama", "bert"):
            raise ValueError(f"unsupported tokenizer.ggml.model {model!r} (supported: 'gpt2', 'llama', 'bert')")
        self.model: str = model
        tokens = _list_key(md, "tokens", str, None)
        if not tokens:
            raise ValueError("GGUF has no (or an empty) tokenizer.ggml.tokens array")
        n = len(tokens)
        scores = _list_key(md, "scores", (float, int), n)
        types = _list_key(md, "token_type", int, n)

        self.tokens: list[str] = []
        self._t2i: dict[str, int] = {}
        for i, text in enumerate(tokens):
            if "\x00" in text:  # llama.cpp reads token texts as C strings
                text = text[:text.index("\x00")]
            if not text:
                logger.warning("empty token at index %d", i)
                text = f"[EMPTY_{i}]"
            if text in self._t2i:
                raise ValueError(f"duplicate token in tokenizer.ggml.tokens: {text!r} has ids "
                                 f"{self._t2i[text]} and {i}")
            self._t2i[text] = i
            self.tokens.append(text)
        self.n_vocab: int = n
        self.scores: list[float] = [float(s) for s in scores[:n]] if scores else [0.0] * n
        self._attr: list[int] = ([TYPE_TO_ATTR.get(t, ATTR_UNDEFINED) for t in types[:n]] if types
                                 else [ATTR_NORMAL] * n)

        # per-type defaults, then the GGUF keys (llama_vocab::impl::load)
        ids: dict[str, int | None] = dict.fromkeys(_ID_KEYS)
        if model == "llama":
            ids.update(bos=1, eos=2, unk=0)
            add_space_prefix, add_bos, self.clean_spaces = True, True, False
            self._pre = None
            merges = None
        elif model == "bert":   # llama.cpp's WPM defaults; GGUF's cls_token_id is the BOS when no bos is set
            ids.update(bos=101, unk=100, sep=102, pad=0, mask=103)
            cls_id = _key(md, "cls_token_id", int)
            if cls_id is not None and 0 <= cls_id < n and _key(md, "bos_token_id", int) is None:
                ids["bos"] = cls_id
            add_space_prefix, add_bos, self.clean_spaces = False, True, True
            self._pre = None
            merges = None
        else:
            merges = _list_key(md, "merges", str, None)
            if merges is None:
                raise ValueError("GGUF has tokenizer.ggml.model 'gpt2' but no tokenizer.ggml.merges")
            ids.update(bos=11, eos=11)
            self._pre = resolve_pre(_key(md, "pre", str))
            add_space_prefix, add_bos = False, self._pre.add_bos
            self.clean_spaces = self._pre.clean_spaces
            if self._pre.no_bos:
                ids["bos"] = None
        self.pre: str | None = _key(md, "pre", str)
        self.add_space_prefix: bool = bool(_key(md, "add_space_prefix", bool, add_space_prefix))
        for name, key in _ID_KEYS.items():
            if ids[name] is not None and ids[name] >= n:
                ids[name] = None
            keys = [key] + ([_DEPRECATED_ID_KEYS[name]] if name in _DEPRECATED_ID_KEYS else [])
            for k in keys:
                v = _key(md, k, int)
                if v is None:
                    continue
                if 0 <= v < n:
                    ids[name] = v
                else:
                    logger.warning("bad special token: tokenizer.ggml.%s = %d, using default %s", k, v, ids[name])
        self.add_bos: bool = bool(_key(md, "add_bos_token", bool, add_bos))
        self.add_eos: bool = bool(_key(md, "add_eos_token", bool, False))
        # WordPiece ends the text with [SEP] (llama.cpp's add_sep; rerank joins a pair with it)
        self.add_sep: bool = bool(_key(md, "add_sep_token", bool, model == "bert"))
        if self.add_bos and ids["bos"] is None:
            raise ValueError("tokenizer.ggml.add_bos_token is true, but tokenizer.ggml.bos_token_id is not set")
        if self.add_sep and model == "bert" and ids["sep"] is None:
            raise ValueError("tokenizer.ggml.add_sep_token is true, but tokenizer.ggml.seperator_token_id is not set")
        if self.add_eos and ids["eos"] is None and model != "bert":   # WPM never adds an EOS
            raise ValueError("tokenizer.ggml.add_eos_token is true, but tokenizer.ggml.eos_token_id is not set")

        self._eog = detect_specials(self.tokens, self._t2i, self._attr, ids, str(md.get("general.name") or ""))
        self.bos_id: int | None = ids["bos"]
        self.eos_id: int | None = ids["eos"]
        self.eot_id: int | None = ids["eot"]
        self.eom_id: int | None = ids["eom"]
        self.unk_id: int | None = ids["unk"]
        self.pad_id: int | None = ids["pad"]
        self.special_ids: dict[str, int | None] = ids

        # special tokens, longest text first (cut out of the text before tokenizing)
        specials = [i for i in range(n) if self._attr[i] & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN)]
        specials.sort(key=lambda i: -len(self.tokens[i].encode("utf-8")))
        self._specials = specials

        self._wpm: WordPiece | None = WordPiece(self._t2i, self.unk_id) if model == "bert" else None
        if model == "llama":
            self._spm: SentencePieceBPE | None = SentencePieceBPE(self._t2i, self.scores, self.unk_id)
            self._bpe: ByteLevelBPE | None = None
        elif model == "bert":
            self._spm, self._bpe = None, None
        else:
            assert self._pre is not None and merges is not None
            self._spm = None
            self._bpe = ByteLevelBPE(self.tokens, self._t2i, merges, self._pre)
        self._pieces: list[bytes | None] = [None] * n

    # ---------------------------------------------------------------- construction helpers
    @classmethod
    def from_metadata(cls, md: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF key/values (``{key: GGUFReader.fields[key].contents()}``)."""
        return cls(md)

    @classmethod
    def from_gguf(cls, path: str) -> Tokenizer:
        """Convenience: read the tokenizer keys of a GGUF file and build."""
        from gguf import GGUFReader

        reader = GGUFReader(path)
        md = {k: f.contents() for k, f in reader.fields.items()
              if k.startswith(("tokenizer.", "general."))}
        return cls(md)

    # ---------------------------------------------------------------- encode
    def _partition(self, text: str, parse_special: bool) -> list[int | str]:
        """Cut special tokens out of ``text`` (llama.cpp's tokenizer_st_partition)."""
        frags: list[int | str] = [text]
        for tid in self._specials:
            a = self._attr[tid]
            if not parse_special and a & (ATTR_CONTROL | ATTR_UNKNOWN):
                continue
            tok = self.tokens[tid]
            if tok not in text:
                continue
            out: list[int | str] = []
            for frag in frags:
                if isinstance(frag, int) or tok not in frag:
                    out.append(frag)
                    continue
                pos = 0
                while True:
                    match = frag.find(tok, pos)
                    if match < 0:
                        if pos < len(frag):
                            out.append(frag[pos:])
                        break
                    left = frag[pos:match]
                    if a & ATTR_LSTRIP:
                        left = left.rstrip(_C_SPACE)
                    if left:
                        out.append(left)
                    out.append(tid)
                    pos = match + len(tok)
                    if a & ATTR_RSTRIP:
                        while pos < len(frag) and frag[pos] in _C_SPACE:
                            pos += 1
            frags = out
        return frags

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Text -> ids. ``add_special`` adds BOS/EOS as the model asks; ``parse_special`` turns
        control-token texts like ``<|im_start|>`` into their ids (user-defined ones always are)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, not {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: pair them up, replace the rest
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        out: list[int] = []
        if add_special and self.add_bos:
            assert self.bos_id is not None
            out.append(self.bos_id)
        frags = self._partition(text, parse_special) if text else []
        if self._spm is not None:
            prev_special = True
            for frag in frags:
                if isinstance(frag, int):
                    out.append(frag)
                    prev_special = True
                    continue
                if self.add_space_prefix and prev_special:
                    frag = " " + frag
                out += self._spm.encode(frag.replace(" ", SPACE))
                prev_special = False
        elif self._wpm is not None:
            for frag in frags:
                out += [frag] if isinstance(frag, int) else self._wpm.encode(frag)
            if add_special and self.add_sep:
                sep = self.special_ids["sep"]
                assert sep is not None
                out.append(sep)
            return out
        else:
            assert self._bpe is not None
            for frag in frags:
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    out += self._bpe.encode(frag)
        if add_special and self.add_eos:
            assert self.eos_id is not None
            out.append(self.eos_id)
        return out

    # ---------------------------------------------------------------- decode
    def _piece(self, tid: int) -> bytes:
        piece = self._pieces[tid]
        if piece is None:
            text, a = self.tokens[tid], self._attr[tid]
            if a & (ATTR_SPECIAL | ATTR_USER_DEFINED):
                piece = text.encode("utf-8")
            elif a & ATTR_NORMAL:
                piece = (text.replace(SPACE, " ").encode("utf-8") if self.model in ("llama", "bert")
                         else byte_level_decode(text))
            elif a & ATTR_BYTE:
                try:
                    piece = bytes([int(text[3:5], 16)])
                except ValueError:
                    piece = b""
            else:  # unused / undefined tokens render as nothing
                piece = b""
            self._pieces[tid] = piece
        return piece

    def _check_id(self, tid: int) -> None:
        if not isinstance(tid, int) or isinstance(tid, bool) or not 0 <= tid < self.n_vocab:
            raise ValueError(f"token id {tid!r} is out of range (vocabulary has {self.n_vocab} tokens)")

    def token_to_piece(self, id: int, special: bool = True) -> bytes:  # noqa: A002 - API name
        """Raw bytes of one token (llama_token_to_piece). ``special=False`` renders control and
        unknown tokens as nothing."""
        self._check_id(id)
        if not special and self._attr[id] & ATTR_SPECIAL:
            return b""
        return self._piece(id)

    def decode_bytes(self, ids: Sequence[int], skip_special: bool = False, clean_spaces: bool = False) -> bytes:
        """llama.cpp's llama_detokenize(remove_special=skip_special, unparse_special=not skip_special).

        With ``clean_spaces=False`` (the default) llama.cpp's clean-up of " ?", " 's"... is not
        applied, so ``decode(encode(s))`` gives ``s`` back; pass ``clean_spaces=True`` for exactly
        what llama_detokenize returns (it does that clean-up when the model's pre-type asks).
        """
        ids = list(ids)
        for tid in ids:
            self._check_id(tid)
        remove_space = self.add_space_prefix
        if skip_special and self.add_bos and ids and ids[0] == self.bos_id:
            remove_space = False
            ids = ids[1:]
        if skip_special and self.add_eos and ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        parts: list[bytes] = []
        for tid in ids:
            piece = self.token_to_piece(tid, special=not skip_special)
            if remove_space and piece.startswith(b" "):
                piece = piece[1:]
            remove_space = False
            parts.append(piece)
        out = b"".join(parts)
        if clean_spaces and self.clean_spaces:
            out = _clean_spaces(out)
        return out

    def decode(self, ids: Sequence[int], skip_special: bool = False, clean_spaces: bool = False) -> str:
        """ids -> text; invalid UTF-8 (e.g. a cut multibyte sequence) becomes U+FFFD."""
        return self.decode_bytes(ids, skip_special, clean_spaces).decode("utf-8", errors="replace")

    def streaming_decoder(self, skip_special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special)

    # ---------------------------------------------------------------- queries
    def is_eog(self, id: int) -> bool:  # noqa: A002 - API name
        """End of generation (llama_vocab::is_eog): EOS, EOT, EOM and the known end-of-turn tokens."""
        return id in self._eog

    @property
    def eog_ids(self) -> frozenset[int]:
        return self._eog

    def token_attr(self, id: int) -> int:  # noqa: A002 - API name
        """llama.cpp's llama_token_attr bit set of a token."""
        self._check_id(id)
        return self._attr[id]

    def is_control(self, id: int) -> bool:  # noqa: A002 - API name
        return bool(self.token_attr(id) & ATTR_CONTROL)

    def token_to_id(self, text: str) -> int | None:
        return self._t2i.get(text)

    def token_text(self, id: int | None) -> str:  # noqa: A002 - API name
        """The vocabulary text of a token (e.g. '<|im_start|>', 'Ġthe'); '' for None."""
        if id is None:
            return ""
        self._check_id(id)
        return self.tokens[id]


def _clean_spaces(text: bytes) -> bytes:
    """The three clean-up passes at the end of llama.cpp's llama_detokenize."""
    b = bytearray(text)
    # 1: " ?", " !", " .", " ," lose the space
    out = bytearray(b[:1])
    for i in range(1, len(b)):
        if b[i - 1] == 0x20 and b[i] in b"?!.,":
            out.pop()
        out.append(b[i])
    b = out
    # 2: a single apostrophe between spaces loses both spaces
    out = bytearray(b[:1])
    i = 1
    while i < len(b):
        x = b[i]
        if x == 0x27 and i + 1 < len(b) and b[i - 1] == 0x20 and b[i + 1] == 0x20:
            out.pop()
            b[i + 1] = 0  # llama.cpp zeroes the skipped space in place; the next test reads it
            out.append(x)
            i += 2
            continue
        out.append(x)
        i += 1
    b = out
    # 3: " 's", " 'm", " 're", " 've" lose the space
    out = bytearray(b[:1])
    for i in range(1, len(b)):
        x = b[i]
        if b[i - 1] == 0x20 and x == 0x27 and i + 1 < len(b):
            x1 = b[i + 1]
            if x1 in b"sm" or (i + 2 < len(b) and (x1, b[i + 2]) in ((0x72, 0x65), (0x76, 0x65))):
                out.pop()
        out.append(x)
    return bytes(out)
