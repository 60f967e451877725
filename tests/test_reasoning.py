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
