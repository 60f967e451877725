"""Replies with several choices (`n` > 1, or several prompts): the choices side by side and one
usage for all of them (completion tokens summed, each prompt counted once)."""
from __future__ import annotations

from collections.abc import Sequence

from ..engine import FinalEvent
from .formats import _chunk


def usage_of(finals: Sequence[FinalEvent], n: int = 1) -> dict:
    """OpenAI's usage of a reply whose finals are n choices per prompt, in index order."""
    n_dec = sum(f.n_decoded for f in finals)
    leads = finals[::max(n, 1)]
    n_prompt = sum(f.n_prompt for f in leads)
    return {"completion_tokens": n_dec, "prompt_tokens": n_prompt, "total_tokens": n_dec + n_prompt,
            "prompt_tokens_details": {"cached_tokens": sum(f.timings.cache_n for f in leads)}}


def merge(replies: Sequence[dict], finals: Sequence[FinalEvent], n: int) -> dict:
    """One reply of every choice: the first reply's fields, all the choices, the summed usage."""
    out = dict(replies[0])
    out["choices"] = [c for r in replies for c in r["choices"]]
    out["usage"] = usage_of(finals, n)
    return out


class UsageTail:
    """A stream's usage chunk, sent once after the last choice's final chunk."""

    def __init__(self, n_choices: int, n: int, cid: str, model: str) -> None:
        self.n_choices, self.n, self.cid, self.model = n_choices, n, cid, model
        self.finals: dict[int, FinalEvent] = {}

    def add(self, f: FinalEvent) -> list[dict]:
        self.finals[f.index] = f
        if len(self.finals) < self.n_choices:
            return []
        u = _chunk(self.cid, self.model, [])
        u["usage"] = usage_of([self.finals[i] for i in sorted(self.finals)], self.n)
        return [u]
