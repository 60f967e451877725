"""SentencePiece-style BPE ("llama" GGUF tokenizers), as llama.cpp's llm_tokenizer_spm does it.

The text (spaces already escaped to U+2581) is split into characters; the adjacent pair whose
concatenation is a vocabulary token with the highest score is merged first (ties: leftmost),
until no pair is a token. A final piece that is no token falls back to its UTF-8 bytes as
``<0xXX>`` tokens.
"""
from __future__ import annotations

import heapq
import logging
from collections.abc import Sequence

logger = logging.getLogger(__name__)

SPACE = "\u2581"


class SentencePieceBPE:
    def __init__(self, token_to_id: dict[str, int], scores: Sequence[float], unk_id: int | None) -> None:
        self._t2i = token_to_id
        self._scores = scores
        self._unk = unk_id
        self._byte_ids: list[int | None] = [self._byte_token(b) for b in range(256)]

    def _byte_token(self, b: int) -> int | None:
        tid = self._t2i.get(f"<0x{b:02X}>")
        if tid is None and b < 0x80:  # llama.cpp falls back to the byte as a one-char token
            tid = self._t2i.get(chr(b))
        return tid

    def encode(self, text: str) -> list[int]:
        """``text`` must already have ' ' replaced by U+2581 (and the space prefix added)."""
        n = len(text)
        if n == 0:
            return []
        t2i = self._t2i
        scores = self._scores
        start = list(range(n))
        length = [1] * n
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        heap: list[tuple[float, int, int, int]] = []

        def try_add(left: int, right: int) -> None:
            if left == -1 or right == -1:
                return
            size = length[left] + length[right]
            tid = t2i.get(text[start[left]:start[left] + size])
            if tid is None:
                return
            heapq.heappush(heap, (-scores[tid], left, right, size))

        for i in range(1, n):
            try_add(i - 1, i)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            if length[left] == 0 or length[right] == 0 or length[left] + length[right] != size:
                continue  # stale: one side was merged since
            length[left] = size
            length[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            try_add(prev[left], left)
            try_add(left, nxt[left])

        out: list[int] = []
        i = 0
        while i != -1:
            piece = text[start[i]:start[i] + length[i]]
            tid = t2i.get(piece)
            if tid is not None:
                out.append(tid)
            else:  # only single characters can miss: merged pieces are tokens by construction
                for b in piece.encode("utf-8"):
                    bid = self._byte_ids[b]
                    if bid is None:
                        # llama.cpp throws (std::out_of_range) here; we emit <unk> instead
                        logger.warning("no byte token for 0x%02X in an SPM vocabulary", b)
                        if self._unk is not None:
                            out.append(self._unk)
                    else:
                        out.append(bid)
            i = nxt[i]
        return out
