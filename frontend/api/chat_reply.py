"""A chat reply's thinking split out (--reasoning-format / the request's reasoning_format): into
``message.reasoning_content`` when not streamed, into ``delta.reasoning_content`` chunks of their
own when streamed, with what might still be a tag held back at chunk edges (model/reasoning.py)."""
from __future__ import annotations

from typing import Any

from ..engine import PartialEvent
from ..model.reasoning import split_reasoning
from .chat_request import ChatPrompt
from .formats import chat_delta, probs_json

_KEY = {"reasoning": "reasoning_content", "content": "content"}


def split_reply(reply: dict, prompt: ChatPrompt) -> dict:
    """A non-streamed chat.completion with choices[0].message.content split."""
    msg = reply["choices"][0]["message"]
    reasoning, content = split_reasoning(msg.get("content") or "", prompt.reasoning_format,
                                         prompt.thinking_forced_open)
    msg["content"] = content
    if reasoning:
        msg["reasoning_content"] = reasoning
    return reply


class ReasoningStream:
    """Chat chunks of one streamed reply, reasoning and content as separate deltas. With
    `hold_content` (tool calls: the content is parsed once complete) only the reasoning is sent
    as it comes; the content collects in `content`."""

    def __init__(self, prompt: ChatPrompt, cid: str, model: str, post_sampling_probs: bool,
                 hold_content: bool = False, index: int = 0) -> None:
        self.splitter = prompt.splitter()
        self.cid, self.model, self.post, self.index = cid, model, post_sampling_probs, index
        self.hold = hold_content
        self.content = ""

    def _chunks(self, parts: list[tuple[str, str]]) -> list[dict]:
        if self.hold:
            self.content += "".join(t for k, t in parts if k == "content")
            parts = [(k, t) for k, t in parts if k == "reasoning"]
        return [chat_delta(self.cid, self.model, {_KEY[kind]: text}, self.index) for kind, text in parts if text]

    def partial(self, ev: PartialEvent) -> list[dict]:
        chunks = self._chunks(self.splitter.feed(ev.text)) if ev.text else []
        if ev.probs and not self.hold:
            if not chunks:
                chunks = [chat_delta(self.cid, self.model, {"content": ""}, self.index)]
            chunks[-1]["choices"][0]["logprobs"] = {"content": probs_json(ev.probs, self.post)}
        return chunks

    def finish(self) -> list[dict[str, Any]]:
        return self._chunks(self.splitter.finish())
