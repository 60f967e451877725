"""Reasoning split out of a chat reply, as llama.cpp's ``--reasoning-format`` does it: the
``<think>...</think>`` block that Qwen3 / DeepSeek-R1 style models open their reply with becomes
``reasoning_content``, the rest ``content``.

- ``none``: nothing is split, the text stays inline in ``content``.
- ``deepseek`` and ``auto`` (llama.cpp's default): a reply that starts (after whitespace) with
  ``<think>`` - or any reply, when the template forced the opening tag into the prompt - has its
  thinking up to ``</think>`` in ``reasoning_content`` (surrounding whitespace trimmed) and the text
  after it, leading whitespace dropped, in ``content``. An unclosed block is all reasoning. A
  ``<think>`` later in the reply is plain content.

`ReasoningSplitter` does this incrementally for a stream: `feed` takes each new piece of text and
returns what can be sent now as ("reasoning" | "content", text) deltas, holding back what might
still turn out to be a tag (a ``</thi`` at a chunk edge) or whitespace that a tag would trim;
`finish` releases the rest. The deltas joined equal `split_reasoning` of the whole text.
"""
from __future__ import annotations

REASONING_FORMATS = ("none", "deepseek", "auto")
THINK_START = "<think>"
THINK_END = "</think>"

__all__ = ["REASONING_FORMATS", "THINK_END", "THINK_START", "ReasoningSplitter", "forced_open", "split_reasoning"]


def forced_open(prompt: str, start: str = THINK_START) -> bool:
    """The rendered prompt ends inside an opened thinking block (the template wrote ``<think>``
    as the start of the reply): generation starts in the reasoning."""
    return prompt.rstrip().endswith(start)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningSplitter:
    """Incremental reasoning/content split of one reply (see the module docstring)."""

    def __init__(self, fmt: str = "auto", thinking_forced_open: bool = False,
                 start: str = THINK_START, end: str = THINK_END) -> None:
        if fmt not in REASONING_FORMATS:
            raise ValueError(f"unknown reasoning format {fmt!r} (one of {', '.join(REASONING_FORMATS)})")
        self.start, self.end = start, end
        # "content": passing through; "begin": before the reply's first non-space text (may open a
        # block); "think": inside the block, nothing sent yet; "reason": inside, some sent; "after":
        # just after the end tag, dropping whitespace
        self.state = "content" if fmt == "none" else ("think" if thinking_forced_open else "begin")
        self.buf = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.buf += text
        out: list[tuple[str, str]] = []
        while True:
            before = (self.state, len(self.buf))
            self._step(out)
            if (self.state, len(self.buf)) == before:
                return _merge(out)

    def finish(self) -> list[tuple[str, str]]:
        """The held-back text once the reply is complete."""
        out: list[tuple[str, str]] = []
        rest, self.buf = self.buf, ""
        if self.state in ("think", "reason"):
            rest = rest.rstrip()
            if rest:
                out.append(("reasoning", rest))
        elif self.state in ("content", "begin") and rest:
            out.append(("content", rest))
        self.state = "content"
        return out

    def _step(self, out: list[tuple[str, str]]) -> None:
        buf = self.buf
        if self.state == "content":
            if buf:
                out.append(("content", buf))
                self.buf = ""
        elif self.state == "begin":
            lead = buf.lstrip()
            if not lead:
                return                              # only whitespace so far: undecided
            if lead.startswith(self.start):
                self.state, self.buf = "think", lead[len(self.start):]
            elif not self.start.startswith(lead):
                self.state = "content"              # the reply does not open a block
        elif self.state in ("think", "reason"):
            if self.state == "think":
                buf = self.buf = buf.lstrip()
            i = buf.find(self.end)
            if i >= 0:
                reasoning = buf[:i].rstrip()
                if reasoning:
                    out.append(("reasoning", reasoning))
                self.state, self.buf = "after", buf[i + len(self.end):]
                return
            keep = _partial_suffix(buf, self.end)
            send = buf[:len(buf) - keep]
            stripped = send.rstrip()                # trailing space waits: the end tag would trim it
            keep += len(send) - len(stripped)
            if stripped:
                out.append(("reasoning", stripped))
                self.state = "reason"
            self.buf = buf[len(buf) - keep:] if keep else ""
        elif self.state == "after":
            lead = buf.lstrip()
            self.buf = lead
            if lead:
                self.state = "content"


def _merge(deltas: list[tuple[str, str]]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for kind, text in deltas:
        if out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + text)
        else:
            out.append((kind, text))
    return out


def split_reasoning(text: str, fmt: str = "auto", thinking_forced_open: bool = False) -> tuple[str, str]:
    """(reasoning_content, content) of a complete reply."""
    s = ReasoningSplitter(fmt, thinking_forced_open)
    parts = s.feed(text) + s.finish()
    return ("".join(t for k, t in parts if k == "reasoning"), "".join(t for k, t in parts if k == "content"))
