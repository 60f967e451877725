"""Byte-level BPE ("gpt2" GGUF tokenizers) with llama.cpp's pre-tokenizer regexes.

The BPE merge itself runs in the Rust ``tokenizers`` library; what makes the result match
llama.cpp is the pre-tokenizer: llama.cpp does not use the ``pre_tokenizer`` section of the
model's tokenizer.json but a fixed list of regexes per ``tokenizer.ggml.pre`` string
(``llm_tokenizer_bpe`` in src/llama-vocab.cpp). The lists below are copied from there. Each
regex of a list is applied to every piece the previous one produced, and text a regex does not
match stays a piece of its own - exactly what a chain of ``Split(..., "isolated")`` does.

llama.cpp runs regexes that use ``\\p{..}`` classes on a "collapsed" text in which every
non-ASCII code point is replaced by one stand-in per category, so ``\\p{Lu}`` and friends mean
any letter there; ``_to_onig`` rewrites them to ``\\p{L}`` so Oniguruma agrees.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Regex, Tokenizer, models, pre_tokenizers

logger = logging.getLogger(__name__)

# --- the regex lists of llama.cpp's llm_tokenizer_bpe, by pre-tokenizer type -----------------

_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PORO = r" ?[^(\s|.,!?…。，、।۔،)]+"
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
           r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+" + _CONTRACTIONS + "?"
          r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*" + _CONTRACTIONS + "?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK_LLM_LETTERS = (
    "A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄ"
    "ῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ"
    "𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃"
)

REGEXES: dict[str, list[str]] = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
    "llama3": [LLAMA3],
    "gpt2": [GPT2],
    "smollm": [r"\p{N}", GPT2],  # also starcoder, refact, command-r, codeshell, exaone, ...
    "qwen2": [QWEN2],
    "qwen35": [QWEN35],
    "falcon": [r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"],
    "deepseek-llm": ["[\r\n]", r"\s?[" + _DEEPSEEK_LLM_LETTERS + "]+", r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
                     r"\s+$", "[一-龥ࠀ-一가-퟿]+", r"\p{N}+"],
    "deepseek-coder": ["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥ࠀ-一가-퟿]+", r"\p{N}"],
    "poro": [_PORO],
    "viking": [_PORO, r"\p{N}"],
    "tekken": [_TEKKEN],
    "gpt4o": [_GPT4O],
    "chameleon": [r"<sentinel:[0-9]+>", r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z", r"([\t\n]|    |  )",
                  r"\p{N}", r"[\p{P}!-/:-@\[-`{-~]", GPT2],
    "bailingmoe": [r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"],
    "seed-coder": [_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+"],
}


@dataclass(frozen=True)
class PreType:
    """What one ``tokenizer.ggml.pre`` string selects in llama.cpp."""

    regexes: str  # key of REGEXES
    clean_spaces: bool = True
    ignore_merges: bool = False
    add_bos: bool = False
    no_bos: bool = False  # llama.cpp sets special_bos_id = NULL (chatglm)


def _table() -> dict[str, PreType]:
    t: dict[str, PreType] = {"default": PreType("default")}
    for n in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
              "jina-v5-nano"):
        t[n] = PreType("llama3", ignore_merges=True, add_bos=True)
    for n in ("dbrx", "smaug-bpe"):
        t[n] = PreType("llama3")
    for n in ("glm4", "chatglm-bpe"):
        t[n] = PreType("llama3", no_bos=True)
    t["deepseek-llm"] = PreType("deepseek-llm", clean_spaces=False)
    t["deepseek-coder"] = PreType("deepseek-coder", clean_spaces=False)
    t["falcon"] = PreType("falcon")
    # "gpt2" is no llama.cpp name (llama.cpp rejects it); taken here as the obvious alias of "gpt-2"
    for n in ("gpt-2", "gpt2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
              "mellum", "modern-bert", "jina-v1-en", "jina-v2-code", "roberta-bpe", "mpt", "olmo", "jais",
              "exaone4"):
        t[n] = PreType("gpt2")
    for n in ("trillion", "granite-docling"):
        t[n] = PreType("gpt2", clean_spaces=False)
    for n in ("starcoder", "refact", "codeshell", "exaone", "minerva-7b", "mellum2"):
        t[n] = PreType("smollm")
    for n in ("smollm", "command-r"):
        t[n] = PreType("smollm", clean_spaces=False)
    for n in ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "hunyuan", "solar-open"):
        t[n] = PreType("qwen2", clean_spaces=False)
    for n in ("megrez", "stablelm2"):
        t[n] = PreType("qwen2")
    t["qwen35"] = PreType("qwen35", clean_spaces=False)
    t["poro-chat"] = PreType("poro", clean_spaces=False)
    for n in ("bloom", "gpt3-finnish"):
        t[n] = PreType("poro")
    t["viking"] = PreType("viking", clean_spaces=False)
    t["tekken"] = PreType("tekken", clean_spaces=False, ignore_merges=True, add_bos=True)
    for n in ("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"):
        t[n] = PreType("gpt4o", clean_spaces=False)
    t["chameleon"] = PreType("chameleon", clean_spaces=False, add_bos=True)
    for n in ("bailingmoe", "bailingmoe2", "llada-moe"):
        t[n] = PreType("bailingmoe", clean_spaces=False)
    t["seed-coder"] = PreType("seed-coder", clean_spaces=False)
    return t


PRE_TYPES: dict[str, PreType] = _table()


def resolve_pre(pre: str | None) -> PreType:
    """The PreType for a ``tokenizer.ggml.pre`` value; missing or unknown -> 'default', logged."""
    if not pre:
        logger.warning("missing tokenizer.ggml.pre: using the 'default' pre-tokenizer; "
                       "generation quality will be degraded (consider regenerating the GGUF)")
        return PRE_TYPES["default"]
    found = PRE_TYPES.get(pre)
    if found is None:
        logger.warning("unknown tokenizer.ggml.pre %r: using the 'default' pre-tokenizer "
                       "(llama.cpp itself refuses to load such a model)", pre)
        return PRE_TYPES["default"]
    return found


def _to_onig(regex: str) -> str:
    """llama.cpp's category collapsing makes \\p{Lu}/\\p{Ll}/... mean any letter; '$' is end of piece."""
    for cat in ("Lu", "Ll", "Lt", "Lm", "Lo"):
        regex = regex.replace("\\p{" + cat + "}", "\\p{L}")
    if regex.endswith("$"):
        regex = regex[:-1] + r"\z"
    return regex


def split_merge(merge: str) -> tuple[str, str] | None:
    """'a b' -> ('a', 'b') the way llama.cpp splits a merge (first space at index >= 1)."""
    pos = merge.find(" ", 1)
    if pos < 0:
        return None
    return merge[:pos], merge[pos + 1:]


class ByteLevelBPE:
    """Encodes text (already cut at special tokens) into ids like llama.cpp's llm_tokenizer_bpe."""

    def __init__(self, tokens: Sequence[str], token_to_id: dict[str, int], merges: Sequence[str],
                 pre: PreType) -> None:
        pairs: list[tuple[str, str]] = []
        dropped = 0
        for m in merges:
            pair = split_merge(m)
            if pair is None or pair[0] not in token_to_id or pair[1] not in token_to_id \
                    or pair[0] + pair[1] not in token_to_id:
                dropped += 1
                continue
            pairs.append(pair)
        if dropped:
            logger.warning("ignored %d BPE merges whose parts or result are not in the vocabulary", dropped)
        bpe = models.BPE(vocab=dict(token_to_id), merges=pairs, ignore_merges=pre.ignore_merges)
        tok = Tokenizer(bpe)
        steps: list[pre_tokenizers.PreTokenizer] = [
            pre_tokenizers.Split(Regex(_to_onig(r)), behavior="isolated") for r in REGEXES[pre.regexes]
        ]
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False))
        # A byte with no token stays a symbol in llama.cpp's merge loop (it is dropped only at the
        # end), so it keeps its neighbours from merging; HF BPE would drop it first. Cutting the
        # word at such bytes gives llama.cpp's result.
        missing = [c for c in BYTE_TO_CHAR.values() if c not in token_to_id]
        if missing:
            cls = "".join(f"\\x{{{ord(c):04X}}}" for c in missing)
            steps.append(pre_tokenizers.Split(Regex(f"[{cls}]"), behavior="isolated"))
        tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
        self._tok = tok
        self.pre = pre

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        return self._tok.encode(text, add_special_tokens=False).ids

    def pre_tokenize(self, text: str) -> list[str]:
        """The pieces BPE runs on (byte-level alphabet), for debugging."""
        assert self._tok.pre_tokenizer is not None
        return [p for p, _ in self._tok.pre_tokenizer.pre_tokenize_str(text)]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (same as llama.cpp's unicode_byte_to_utf8_map)."""
    bs = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


BYTE_TO_CHAR: dict[int, str] = _bytes_to_unicode()
CHAR_TO_BYTE: dict[str, int] = {c: b for b, c in BYTE_TO_CHAR.items()}
# str.translate table: byte-level char -> chr(byte); any other char -> U+FFFF so latin-1 fails
_TRANSLATE = {ord(c): chr(b) for c, b in CHAR_TO_BYTE.items()}
for _cp in range(0x180):
    _TRANSLATE.setdefault(_cp, "\uffff")


def byte_level_decode(text: str) -> bytes:
    """A byte-level token's text -> raw bytes, like llama.cpp's llama_decode_text."""
    try:
        return text.translate(_TRANSLATE).encode("latin-1")
    except UnicodeEncodeError:
        pass
    out = bytearray()
    for ch in text:
        b = CHAR_TO_BYTE.get(ch)
        if b is not None:
            out.append(b)
        else:  # llama.cpp's marker for a char outside the byte alphabet
            utf8 = ch.encode("utf-8")
            out += b"[UNK_BYTE_0x" + utf8.hex().encode() + text.encode("utf-8") + b"]"
    return bytes(out)
