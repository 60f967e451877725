"""Token attributes and the special tokens llama.cpp finds by their text (llama_vocab::impl::load).

GGUF token types become llama.cpp's attribute bits; EOT/EOM/FIM tokens the file does not name
are found by their text, tokens that look like control tokens become control tokens, and the
end-of-generation set is built - all in the order llama.cpp does it.
"""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

# GGUF token types (tokenizer.ggml.token_type)
TYPE_UNDEFINED, TYPE_NORMAL, TYPE_UNKNOWN, TYPE_CONTROL, TYPE_USER_DEFINED, TYPE_UNUSED, TYPE_BYTE = range(7)
# llama_token_attr bits
ATTR_UNDEFINED = 0
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5
ATTR_LSTRIP = 1 << 7
ATTR_RSTRIP = 1 << 8
TYPE_TO_ATTR = {TYPE_UNKNOWN: ATTR_UNKNOWN, TYPE_UNUSED: ATTR_UNUSED, TYPE_NORMAL: ATTR_NORMAL,
                 TYPE_CONTROL: ATTR_CONTROL, TYPE_USER_DEFINED: ATTR_USER_DEFINED, TYPE_BYTE: ATTR_BYTE}
ATTR_SPECIAL = ATTR_UNKNOWN | ATTR_CONTROL

# token texts llama.cpp recognises when the GGUF does not name the token (in llama.cpp's order)
EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
              "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
EOM_TEXTS = ("<|eom_id|>",)
FIM_TEXTS = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
EOG_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
))


def detect_specials(tokens: list[str], t2i: dict[str, int], attr: list[int], ids: dict[str, int | None],
                    general_name: str) -> frozenset[int]:
    """Fill in ``ids`` (eot, eom, fim_*) found by text, update ``attr`` in place, and return the
    end-of-generation ids - llama.cpp's text-based detection, in its order."""

    def mark_control(tid: int) -> None:
        if not attr[tid] & ATTR_CONTROL:
            logger.debug("control-looking token %d %r was not control-type; overriding", tid,
                         tokens[tid])
            attr[tid] |= ATTR_CONTROL

    for name, texts in (("eot", EOT_TEXTS), ("eom", EOM_TEXTS), *FIM_TEXTS.items()):
        if ids[name] is not None:
            continue
        for text in texts:  # llama.cpp takes the first hit in hash-map order; we use list order
            tid = t2i.get(text)
            if tid is not None:
                ids[name] = tid
                mark_control(tid)
                break
    for tid, a in enumerate(attr):
        if a & ATTR_CONTROL and not a & ATTR_UNUSED and "unused" in tokens[tid]:
            attr[tid] |= ATTR_UNUSED

    eog: set[int] = {ids[k] for k in ("fim_pad", "fim_rep", "fim_sep") if ids[k] is not None}
    for text in EOG_TEXTS:
        tid = t2i.get(text)
        if tid is not None:
            eog.add(tid)
            mark_control(tid)
    for text in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):
        tid = t2i.get(text)
        if tid is not None:
            attr[tid] = ATTR_USER_DEFINED
    eog.update(ids[k] for k in ("eos", "eot", "eom") if ids[k] is not None)
    eog_texts = {tokens[t]: t for t in eog}
    has_call = "<|call|>" in eog_texts or "<|calls|>" in eog_texts
    if "<|end|>" in eog_texts and has_call and ("<|return|>" in eog_texts or "<|flush|>" in eog_texts):
        eog.discard(eog_texts["<|end|>"])
        attr[eog_texts["<|end|>"]] = ATTR_USER_DEFINED
    if "<|tool_response>" in eog_texts and "</s>" in eog_texts:
        eog.discard(eog_texts["</s>"])
        attr[eog_texts["</s>"]] = ATTR_NORMAL
    eog_set = frozenset(eog)

    name = general_name.lower()
    if any(s in name for s in ("phi-3", "phi3")):
        for tid, a in enumerate(attr):
            if a & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN):
                attr[tid] |= ATTR_RSTRIP
        for text, on in (("</s>", True), ("<unk>", False), ("<s>", False), ("<|endoftext|>", False)):
            tid = t2i.get(text)
            if tid is not None:
                attr[tid] = attr[tid] | ATTR_RSTRIP if on else attr[tid] & ~ATTR_RSTRIP
    return eog_set
