"""/v1/completions' `logprobs` in OpenAI's legacy shape, and `echo`.

`choices[].logprobs = {tokens, token_logprobs, top_logprobs, text_offset}`: each token's text, its
log-probability, the `logprobs` most probable tokens there as {text: logprob}, and where the
token starts in the choice's text. llama-server sends `{"content": [...]}` there (the chat shape);
that key stays beside the legacy ones for its clients. With `echo` the choice's text starts with
the prompt and, with logprobs, the prompt's tokens come first (the first one's logprob and top
are null: nothing precedes it). llama-server refuses echo; OpenAI's legacy API had it.
`CompletionReply` builds the route's reply, or its stream's chunks, from the engine's events.
"""
from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from llamarpc.proto.errors import BackendError

from ..engine import FinalEvent, PartialEvent, TaskParams, TokenOutput
from ..engine.kv_cells import ContextFull
from ..engine.prompt_probs import prompt_token_probs
from ..model.tokenizer import Tokenizer
from .choices import usage_of
from .errors import APIError, bad_request
from .formats import _logp, oai_completion, oai_completion_chunk, probs_json
from .schemas import CompletionRequest
from .state import ServerState
from .stream import Submission

MAX_LOGPROBS = 20   # OpenAI's bound on top_logprobs, taken for the legacy `logprobs` too


def prompt_texts(raw: Any, prompts: Sequence[Sequence[int]], tok: Tokenizer) -> list[str]:
    """What `echo` puts first in each prompt's choices: the prompt as sent when it was text, else
    its tokens detokenized."""
    if isinstance(raw, str) and len(prompts) == 1:
        return [raw]
    if isinstance(raw, list) and len(raw) == len(prompts) and all(isinstance(p, str) for p in raw):
        return list(raw)
    return [tok.decode(list(p)) for p in prompts]


def _text(piece: bytes) -> str:
    """A token's text as the choice's text shows it: a byte that is no character alone is one U+FFFD."""
    return piece.decode("utf-8", "replace")


class ChoiceLogprobs:
    """One choice's legacy logprobs, formatted piece by piece as its text grows (a stream), with
    text_offset counting on from where the last piece ended."""

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset

    def format(self, items: Sequence[TokenOutput | None], prompt: Sequence[int] = (),
               tok: Tokenizer | None = None) -> dict:
        """The legacy fields of `items`; a None item (the first prompt token) takes its text
        from `prompt` and has null logprob and top."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for k, o in enumerate(items):
            if o is None:
                assert tok is not None
                s = _text(tok.token_to_piece(int(prompt[k])))
                lp: float | None = None
                top: dict[str, float] | None = None
            else:
                s = _text(o.piece)
                lp = _logp(o.prob) if not math.isnan(o.prob) else None
                top = {}
                for t in o.top:
                    top.setdefault(_text(t.piece), _logp(t.prob))
            out["tokens"].append(s)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(top)
            out["text_offset"].append(self.offset)
            self.offset += len(s)
        return out


def choice_logprobs(lp: ChoiceLogprobs, probs: Sequence[TokenOutput], post: bool,
                    prompt_items: Sequence[TokenOutput | None] | None = None, prompt: Sequence[int] = (),
                    tok: Tokenizer | None = None, text_start: int | None = None) -> dict | None:
    """A choice's `logprobs` object: the echoed prompt's tokens (if any), then `probs`; None when
    there is nothing to report. `text_start` moves the offset to where the generated text begins."""
    if not probs and not prompt_items:
        return None
    legacy = lp.format(prompt_items, prompt, tok) if prompt_items else \
        {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    if text_start is not None:
        lp.offset = text_start
    gen = lp.format(probs)
    for key, vals in gen.items():
        legacy[key] += vals
    return {"content": probs_json(list(probs), post), **legacy}


@dataclasses.dataclass
class Echo:
    """Per prompt: the text `echo` puts first, its tokens, and their probabilities (with logprobs)."""
    texts: list[str]
    prompts: list[list[int]]
    items: list[list[TokenOutput | None] | None]

    def part(self, i: int) -> tuple[str, list[TokenOutput | None] | None, list[int]]:
        if not self.texts:
            return "", None, []
        return self.texts[i], self.items[i], self.prompts[i]


async def echo_parts(st: ServerState, r: CompletionRequest, sub: Submission, n_probs: int) -> Echo:
    """`echo` of a request whose tasks are submitted: the prompts' texts, and with `logprobs` their
    tokens' probabilities (computed on the engine thread beside the running steps)."""
    if not r.echo:
        return Echo([], [], [])
    assert st.model is not None and st.engine is not None
    prompts = [t.prompt for t in sub.tasks[::sub.n]]
    texts = prompt_texts(r.prompt, prompts, st.model.tokenizer)
    if n_probs <= 0:
        return Echo(texts, prompts, [None] * len(prompts))
    fut = st.engine.call(lambda eng: [prompt_token_probs(eng, p, n_probs) for p in prompts])
    try:
        items = await asyncio.wait_for(asyncio.wrap_future(fut), st.settings.timeout)
    except ValueError as e:
        raise bad_request(str(e)) from None
    except (BackendError, ContextFull) as e:
        raise APIError(503, f"the prompt's logprobs could not be computed: {e}", "unavailable_error") from None
    except asyncio.TimeoutError:
        fut.cancel()
        raise APIError(503, "the engine did not answer in time", "unavailable_error") from None
    return Echo(texts, prompts, items)


class CompletionReply:
    """/v1/completions' reply (`reply`) or stream chunks (`chunks`): each choice's text after its
    echoed prompt, its legacy logprobs with text_offset running on over the chunks."""

    def __init__(self, echo: Echo, params: TaskParams, n: int, n_tasks: int, tok: Tokenizer, cid: str,
                 model: str) -> None:
        self.echo, self.params, self.n, self.tok, self.cid, self.model = echo, params, n, tok, cid, model
        self.lps = [ChoiceLogprobs() for _ in range(n_tasks)]
        self.started: set[int] = set()

    def reply(self, finals: list[FinalEvent]) -> dict:
        out = oai_completion(finals, self.cid, self.model)
        out["usage"] = usage_of(finals, self.n)
        for f, choice in zip(finals, out["choices"]):
            text, items, prompt = self.echo.part(f.index // self.n)
            choice["text"] = text + f.content
            if self.params.n_probs > 0:
                choice["logprobs"] = choice_logprobs(self.lps[f.index], f.probs, self.params.post_sampling_probs,
                                                     items, prompt, self.tok, len(text))
        return out

    def chunks(self, ev: PartialEvent | FinalEvent) -> list[dict]:
        post = self.params.post_sampling_probs
        head = []
        if ev.index not in self.started:     # the echoed prompt, once per choice, before its tokens
            self.started.add(ev.index)
            text, items, prompt = self.echo.part(ev.index // self.n)
            self.lps[ev.index].offset = len(text)
            if text:
                c = oai_completion_chunk(PartialEvent(ev.index, text, [], [], 0, 0, 0), None, self.cid, self.model,
                                         post)
                c["choices"][0]["logprobs"] = choice_logprobs(ChoiceLogprobs(), [], post, items, prompt, self.tok) \
                    if self.params.n_probs > 0 else None
                head.append(c)
        if isinstance(ev, FinalEvent):
            return [*head, oai_completion_chunk(None, ev, self.cid, self.model, post)]
        if not ev.text and not ev.probs:
            return head
        c = oai_completion_chunk(ev, None, self.cid, self.model, post)
        if ev.probs:
            c["choices"][0]["logprobs"] = choice_logprobs(self.lps[ev.index], ev.probs, post)
        return [*head, c]
