"""llama.cpp's built-in chat templates by name (``--chat-template gemma``): rendered exactly as
libllama's llama_chat_apply_template renders them (tests/fixtures/chat_builtin.json, made by
scripts/make_chat_template_fixture.py), through render_chat as the server and the CLI call it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from llamarpc.frontend.model.chat_template import BUILTIN_TEMPLATES, render_chat

CASES = json.loads((Path(__file__).parent / "fixtures" / "chat_builtin.json").read_text())["cases"]


def test_every_builtin_is_in_the_fixture():
    assert {c["name"] for c in CASES} == set(BUILTIN_TEMPLATES)
    for name in ("chatml", "llama2", "llama3", "gemma", "mistral-v7", "phi3", "command-r", "deepseek3"):
        assert name in BUILTIN_TEMPLATES


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['name']}-{len(c['messages'])}-{int(c['add_ass'])}")
def test_builtin_equals_llama_cpp(case):
    assert render_chat(case["name"], case["messages"], add_generation_prompt=case["add_ass"]) == case["text"]


def test_gemma_by_name_with_content_parts():
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]
    assert render_chat(" gemma ", msgs) == ("<start_of_turn>user\nBe brief.\n\nHi\nthere<end_of_turn>\n"
                                            "<start_of_turn>model\n")
    # a template that merely contains a name is a jinja template, not the built-in
    assert render_chat("gemma{{ messages | length }}", msgs) == "gemma2"


def test_no_template_in_the_gguf_is_said_at_load(tmp_path, caplog):
    import logging

    from llamarpc.client.local import LocalBackend
    from llamarpc.frontend.engine import load_model
    from synth import write_model
    m = write_model(tmp_path / "m.gguf", n_layer=1, n_embd=64, n_head=2, n_head_kv=1, n_ff=64)
    with caplog.at_level(logging.INFO, logger="llamarpc.frontend.engine.loader"):
        load_model(str(m.path), [LocalBackend()], n_ctx=16).close()
    assert any("no tokenizer.chat_template" in r.getMessage() and "chatml" in r.getMessage() and "gemma" in r.getMessage()
               for r in caplog.records)


def test_a_broken_template_in_the_gguf_is_said_at_load(tmp_path, caplog):
    import logging

    from llamarpc.client.local import LocalBackend
    from llamarpc.frontend.engine import load_model
    from synth import write_model
    m = write_model(tmp_path / "m.gguf", n_layer=1, n_embd=64, n_head=2, n_head_kv=1, n_ff=64,
                    chat_template="{% for m in messages %}{{ m.content }}")
    with caplog.at_level(logging.INFO, logger="llamarpc.frontend.engine.loader"):
        load_model(str(m.path), [LocalBackend()], n_ctx=16).close()
    assert any("unusable" in r.getMessage() and "does not compile" in r.getMessage() for r in caplog.records)
