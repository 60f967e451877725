"""Generated tokens -> the text a client sees, with stop strings handled as llama.cpp's server
does: a full stop string ends generation and is never sent; while the end of the text could still
become a stop string, that part is held back. Incomplete UTF-8 is held back too."""
from __future__ import annotations

import re
from collections.abc import Sequence

from ..model.tokenizer import Tokenizer


def find_partial_stop(stop: str, text: str) -> int:
    """Where the longest prefix of `stop` that ends `text` begins, or -1 (llama.cpp's
    find_partial_stop_string)."""
    if not text or not stop:
        return -1
    last = text[-1]
    for i in range(len(stop) - 1, -1, -1):
        if stop[i] == last and text.endswith(stop[: i + 1]):
            return len(text) - i - 1
    return -1


class OutputText:
    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (),
                 stop_regex: re.Pattern[str] | None = None) -> None:
        self._dec = tokenizer.streaming_decoder(skip_special=True)
        self.stop = [s for s in stop if s]
        self.stop_regex = stop_regex
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self.text = ""
        self.n_sent = 0
        self.stopping_word = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the text that may be sent now. Sets `stopped` on a stop match."""
        if self.stopped:
            return ""
        piece = self._dec.feed(token)
        self.text += piece
        return self._advance(len(piece), final=False)

    def finish(self) -> str:
        """Generation ended (not by a stop string): everything held back goes out."""
        if not self.stopped:
            self.text += self._dec.flush()
            self._advance(0, final=True)
        out = self.text[self.n_sent:]
        self.n_sent = len(self.text)
        return out

    def _advance(self, last_len: int, final: bool) -> str:
        stop_pos = -1
        if self.stop:
            start = max(0, len(self.text) - last_len - self._max_stop)
            for w in self.stop:
                p = self.text.find(w, start)
                if p != -1 and (stop_pos == -1 or p < stop_pos):
                    stop_pos, self.stopping_word = p, w
        if self.stop_regex is not None:
            m = self.stop_regex.search(self.text)
            if m is not None and (stop_pos == -1 or m.start() < stop_pos):
                stop_pos, self.stopping_word = m.start(), m.group(0)
        if stop_pos != -1:
            self.stopped = True
            self.text = self.text[:stop_pos]
            out = self.text[self.n_sent:] if stop_pos > self.n_sent else ""
            self.n_sent = max(self.n_sent, len(self.text))
            return out
        if final:
            return ""
        hold = len(self.text)
        for w in self.stop:
            p = find_partial_stop(w, self.text)
            if p != -1:
                hold = min(hold, p)
        hold = max(hold, self.n_sent)
        out = self.text[self.n_sent:hold]
        self.n_sent = hold
        return out
