"""Chat templates: the SmolLM2 template renders ChatML exactly; the sandbox holds."""
from __future__ import annotations

import os

import pytest
from llamarpc.frontend.model.chat_template import CHATML_TEMPLATE, ChatTemplateError, render_chat

MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def smol_template() -> str:
    if not os.path.exists(MODEL):
        pytest.skip("models/SmolLM2-135M-Instruct.Q4_1.gguf is absent (scripts/get-model.sh fetches it)")
    from gguf import GGUFReader

    template = GGUFReader(MODEL).fields["tokenizer.chat_template"].contents()
    assert isinstance(template, str)
    return template


def test_smollm2_template_default_system(smol_template: str) -> None:
    out = render_chat(smol_template, [{"role": "user", "content": "Hi there"}])
    assert out == (f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n"
                   "<|im_start|>user\nHi there<|im_end|>\n"
                   "<|im_start|>assistant\n")


def test_smollm2_template_conversation(smol_template: str) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Ünïcödé 😀"},
    ]
    out = render_chat(smol_template, messages, add_generation_prompt=False)
    assert out == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                   "<|im_start|>user\n2+2?<|im_end|>\n"
                   "<|im_start|>assistant\n4<|im_end|>\n"
                   "<|im_start|>user\nÜnïcödé 😀<|im_end|>\n")
    assert render_chat(smol_template, messages) == out + "<|im_start|>assistant\n"


def test_fallback_chatml() -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    expected = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat(None, messages) == expected
    assert render_chat("", messages) == expected
    assert render_chat(CHATML_TEMPLATE, messages, add_generation_prompt=False) == expected[: -len(
        "<|im_start|>assistant\n")]


def test_raise_exception() -> None:
    t = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok"
    assert render_chat(t, [{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ChatTemplateError, match="first must be user"):
        render_chat(t, [{"role": "system", "content": "x"}])
    assert issubclass(ChatTemplateError, ValueError)


def test_sandbox_blocks_dunder_access() -> None:
    out = render_chat("{{ ''.__class__ }}", [])
    assert "class" not in out
    with pytest.raises(ChatTemplateError):
        render_chat("{{ ''.__class__.__mro__[1].__subclasses__() }}", [])
    with pytest.raises(ChatTemplateError):
        render_chat("{{ raise_exception.__globals__ }}x{{ raise_exception.__globals__['os'] }}", [])


def test_sandbox_is_immutable() -> None:
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(ChatTemplateError):
        render_chat("{{ messages.append({'role': 'evil'}) }}", messages)
    with pytest.raises(ChatTemplateError):
        render_chat("{% set _ = messages[0].update({'content': 'y'}) %}", messages)
    assert messages == [{"role": "user", "content": "x"}]


def test_syntax_error_is_chat_template_error() -> None:
    with pytest.raises(ChatTemplateError, match="compile"):
        render_chat("{% for m in messages %}", [])


def test_helpers_and_hf_options() -> None:
    t = ("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m | tojson }}{% endfor %}\n"
         "{% generation %}G{% endgeneration %}|{{ strftime_now('%Y') | length }}|{{ bos_token }}{{ eos_token }}"
         "|{{ tools | tojson }}")
    messages = [{"role": "user", "content": "é<b>"}, {"role": "user", "content": "second"}]
    out = render_chat(t, messages, bos_token="<s>", eos_token="</s>", tools=[{"name": "f"}])
    assert out == '{"role": "user", "content": "é<b>"}G|4|<s></s>|[{"name": "f"}]'


def test_trim_and_lstrip_blocks() -> None:
    t = "  {% for m in messages %}\n{{ m['content'] }}\n  {% endfor %}\n"
    assert render_chat(t, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "a\nb\n"


def test_messages_must_be_list_of_dicts() -> None:
    with pytest.raises(ChatTemplateError):
        render_chat(None, ["not a dict"])  # type: ignore[list-item]
