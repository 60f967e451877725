"""The reasoning split (frontend/model/reasoning.py) as a pure function and as the incremental
splitter a stream uses: every way of cutting the text into chunks gives the same deltas as the
whole text, and a partial tag at a chunk edge never reaches the content."""
from __future__ import annotations

import random

import pytest
from llamarpc.frontend.model.reasoning import ReasoningSplitter, forced_open, split_reasoning

CASES = [
    # (text, forced_open, (reasoning, content)) for deepseek / auto
    ("<think>\nLet me see: 2+2.\n</think>\n\nIt is 4.", False, ("Let me see: 2+2.", "It is 4.")),
    ("  <think>a  b</think>c", False, ("a  b", "c")),
    ("No thinking here. <think>x</think>", False, ("", "No thinking here. <think>x</think>")),
    ("<think>never closed, cut by the length limit", False, ("never closed, cut by the length limit", "")),
    ("<think></think>Answer", False, ("", "Answer")),
    ("\nplanning\n</think>\n\nDone", True, ("planning", "Done")),
    ("just thoughts", True, ("just thoughts", "")),
    ("<thin", False, ("", "<thin")),
    ("<think>a</thinking> b</think>c <", False, ("a</thinking> b", "c <")),
    ("", False, ("", "")),
    ("  \n", False, ("", "  \n")),
]


def _joined(parts):
    return ("".join(t for k, t in parts if k == "reasoning"), "".join(t for k, t in parts if k == "content"))


@pytest.mark.parametrize("fmt", ["deepseek", "auto"])
@pytest.mark.parametrize("text,opened,want", CASES)
def test_split(fmt, text, opened, want):
    assert split_reasoning(text, fmt, opened) == want


@pytest.mark.parametrize("text,opened,want", CASES)
def test_none_keeps_everything_inline(text, opened, want):
    assert split_reasoning(text, "none", opened) == ("", text)


@pytest.mark.parametrize("text,opened,want", CASES)
def test_any_chunking_streams_the_same(text, opened, want):
    rng = random.Random(len(text))
    cuttings = [list(text), [text]] + [sorted(rng.sample(range(len(text) + 1), min(3, len(text) + 1)))
                                       for _ in range(20)]
    for cut in cuttings:
        if cut and isinstance(cut[0], int):
            edges = [0, *cut, len(text)]
            chunks = [text[a:b] for a, b in zip(edges, edges[1:], strict=False)]
        else:
            chunks = cut
        s = ReasoningSplitter("auto", opened)
        parts = [p for c in chunks for p in s.feed(c)] + s.finish()
        assert _joined(parts) == want, chunks
        assert all(t for _, t in parts)                 # no empty deltas


def test_partial_end_tag_at_a_chunk_edge_is_held_back():
    s = ReasoningSplitter("deepseek")
    assert s.feed("<think>step one") == [("reasoning", "step one")]
    assert s.feed(" then two</thi") == [("reasoning", " then two")]     # '</thi' waits
    assert s.feed("nk>\n\nHel") == [("content", "Hel")]
    assert s.feed("lo") == [("content", "lo")]
    assert s.finish() == []


def test_partial_start_tag_and_false_alarm():
    s = ReasoningSplitter("auto")
    assert s.feed("<th") == []                          # might open a block
    assert s.feed("ree> apples") == [("content", "<three> apples")]
    s = ReasoningSplitter("auto")
    assert s.feed("\n") == [] and s.feed("<think>") == [] and s.feed("x") == [("reasoning", "x")]


def test_a_partial_tag_that_never_completes_is_reasoning_at_the_end():
    s = ReasoningSplitter("auto", thinking_forced_open=True)
    assert s.feed("hmm </th") == [("reasoning", "hmm")]
    assert s.finish() == [("reasoning", " </th")]


def test_forced_open_and_formats():
    assert forced_open("<|im_start|>assistant\n<think>\n")
    assert not forced_open("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not forced_open("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="reasoning format"):
        ReasoningSplitter("deepseek-legacy")


# -- the chat reply (frontend/api/chat_reply.py) over a fake token stream ------------------------
def _events(pieces):
    from llamarpc.frontend.engine import PartialEvent

    return [PartialEvent(index=0, text=p, tokens=[i], probs=[], n_decoded=i + 1, n_prompt=3, id_slot=0)
            for i, p in enumerate(pieces)]


PIECES = ["<th", "ink>", "\nI should", " call f.", "\n</th", "ink>\n\n", "<tool_call>", '{"name": "f", ',
          '"arguments": {"x": 1}}', "</tool_call>"]


def test_stream_reasoning_then_content_deltas():
    from llamarpc.frontend.api.chat_reply import ReasoningStream
    from llamarpc.frontend.api.chat_request import ChatPrompt

    s = ReasoningStream(ChatPrompt("", "auto"), "id", "m", False)
    deltas = [c["choices"][0]["delta"] for ev in _events(PIECES) for c in s.partial(ev)] + \
        [c["choices"][0]["delta"] for c in s.finish()]
    assert deltas[0] == {"reasoning_content": "I should"}
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "I should call f."
    assert "".join(d.get("content", "") for d in deltas) == "".join(PIECES[6:])
    assert all(set(d) in ({"reasoning_content"}, {"content"}) for d in deltas)
    assert not any("</th" in d.get("content", "") or "</th" in d.get("reasoning_content", "") for d in deltas)
    inline = ReasoningStream(ChatPrompt("", "none"), "id", "m", False)
    assert "".join(c["choices"][0]["delta"]["content"] for ev in _events(PIECES) for c in inline.partial(ev)) \
        == "".join(PIECES)


def test_tool_calls_after_reasoning_streamed_and_not():
    from llamarpc.frontend.api.chat_reply import ReasoningStream, split_reply
    from llamarpc.frontend.api.chat_request import ChatPrompt
    from llamarpc.frontend.api.tools import ToolSpec, shape_reply, stream_deltas

    spec = ToolSpec([{"type": "function", "function": {"name": "f", "parameters": {}}}], "auto", native=True)
    reply = {"choices": [{"finish_reason": "stop", "index": 0,
                          "message": {"role": "assistant", "content": "".join(PIECES)}}]}
    msg = shape_reply(split_reply(reply, ChatPrompt("", "deepseek")), spec)["choices"][0]
    assert msg["finish_reason"] == "tool_calls" and msg["message"]["reasoning_content"] == "I should call f."
    assert msg["message"]["content"] is None
    assert msg["message"]["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"x": 1}'}
    # streamed with tools: the reasoning goes out as it comes, the content is held for the parse
    s = ReasoningStream(ChatPrompt("", "deepseek"), "id", "m", False, hold_content=True)
    live = [c["choices"][0]["delta"] for ev in _events(PIECES) for c in s.partial(ev)]
    assert live and all(set(d) == {"reasoning_content"} for d in live)
    assert s.finish() == [] and s.content == "".join(PIECES[6:])
    deltas, calls = stream_deltas(s.content, spec)
    assert [c["function"]["name"] for c in calls] == ["f"] and "content" not in deltas[0]
