"""Chat templates rendered as llama.cpp renders them and the chat options around them: lenient
undefined variables, strftime_now / date_string, built-in names and startup checks of
--chat-template, add_generation_prompt / continue_final_message / prefill and their 400s,
enable_thinking from --reasoning-budget and chat_template_kwargs, and the reasoning split over
HTTP (non-streamed and streamed) on a tiny synthetic model whose output a grammar forces."""
from __future__ import annotations

import datetime
from types import SimpleNamespace

import httpx
import pytest
from llamarpc.frontend.api.chat_request import chat_prompt, supports_thinking
from llamarpc.frontend.api.errors import APIError
from llamarpc.frontend.api.state import ServerSettings, ServerState
from llamarpc.frontend.cli.args import build_parser
from llamarpc.frontend.cli.server import settings_from_args
from llamarpc.frontend.model.chat_template import render_chat
from llamarpc.proto.cliargs import CLIError
from serverproc import sse_events, start_server
from synth import write_model

# Qwen3's shape: reasoning_content of assistant turns rendered in <think>, enable_thinking=false
# writes an empty thinking block into the generation prompt
QWEN3 = """{%- for message in messages %}
{%- if message.role == 'assistant' %}
{%- set content = message.content %}
{%- set reasoning = '' %}
{%- if message.reasoning_content is string %}{%- set reasoning = message.reasoning_content %}
{%- elif '</think>' in content %}
{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}
{%- set content = content.split('</think>')[-1].lstrip('\\n') %}
{%- endif %}
{%- if reasoning %}{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}
{%- else %}{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{%- endif %}
{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- if open_think %}{{- '<think>\\n' }}{%- endif %}
{%- endif %}"""
# DeepSeek-R1-distill's shape: the generation prompt opens the thinking block itself
FORCED = QWEN3.replace("{{- '<|im_start|>assistant\\n' }}\n{%- if enable_thinking",
                       "{{- '<|im_start|>assistant\\n<think>\\n' }}\n{%- if enable_thinking")
USER = [{"role": "user", "content": "Hi"}]


class _Tok:
    def __init__(self, add_bos: bool = False, add_eos: bool = False) -> None:
        self.add_bos, self.add_eos, self.bos_id, self.eos_id = add_bos, add_eos, 0, 2

    def token_text(self, i):
        return {0: "<s>", 2: "</s>"}.get(i, "")


def _state(template: str | None, tok: _Tok | None = None, **settings) -> ServerState:
    st = ServerState(ServerSettings(model_path="m.gguf", chat_template=template, **settings))
    st.model = SimpleNamespace(tokenizer=tok or _Tok(), chat_template=None)
    return st


def _prompt(st, messages, **body):
    return chat_prompt(st, body, messages, body.get("chat_template_kwargs") or {})


def _400(st, messages, **body) -> str:
    with pytest.raises(APIError) as e:
        _prompt(st, messages, **body)
    assert e.value.code == 400
    return str(e.value.message)


# -- rendering --------------------------------------------------------------------------------------
def test_undefined_variables_render_as_llama_cpp():
    t = ("[{{ nope }}|{{ nope.a.b }}|{{ nope['k'][0] }}|{% if nope %}T{% else %}F{% endif %}|"
         "{% for x in nope %}x{% endfor %}|{{ 'a' + nope }}|{{ nope + 'b' }}|{{ nope is defined }}|"
         "{{ messages[7].content }}]")
    assert render_chat(t, USER) == "[|||F||a|b|False|]"


def test_strftime_now_and_date_string():
    out = render_chat("{{ strftime_now('%Y-%m-%d') }}|{{ date_string }}", USER)
    today = datetime.datetime.now()
    assert out in (f"{today:%Y-%m-%d}|{today:%d %b %Y}",
                   f"{datetime.datetime.now():%Y-%m-%d}|{datetime.datetime.now():%d %b %Y}")
    # a template's own default (Llama 3.1: "26 Jul 2024") gives way to today's date, as in llama.cpp
    t = '{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}{{ date_string }}'
    assert render_chat(t, USER) != "26 Jul 2024"


def test_qwen3_enable_thinking_and_history_reasoning():
    st = _state(QWEN3)
    assert supports_thinking(QWEN3) and not supports_thinking("chatml")
    on = _prompt(st, USER)
    assert on.text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n" and not on.thinking_forced_open
    off = _prompt(st, USER, chat_template_kwargs={"enable_thinking": False})
    assert off.text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") and not off.thinking_forced_open
    assert _prompt(_state(QWEN3, reasoning_budget=0), USER).text == off.text       # --reasoning-budget 0
    cli_off = _state(QWEN3, chat_template_kwargs={"enable_thinking": False})       # --chat-template-kwargs
    assert _prompt(cli_off, USER).text == off.text
    assert _prompt(cli_off, USER, chat_template_kwargs={"enable_thinking": True}).text == on.text
    assert _prompt(st, USER, reasoning_effort="none").text == off.text                 # OpenAI's field
    assert "low" in _prompt(_state("{{ reasoning_effort }}"), USER, reasoning_effort="low").text
    history = [*USER, {"role": "assistant", "content": "Hello!", "reasoning_content": "greet back"},
               {"role": "user", "content": "Bye"}]
    assert ("<|im_start|>assistant\n<think>\ngreet back\n</think>\n\nHello!<|im_end|>\n"
            in _prompt(st, history).text)


def test_forced_open_template():
    p = _prompt(_state(FORCED), USER)
    assert p.text.endswith("<think>\n") and p.thinking_forced_open and p.reasoning_format == "auto"
    assert not _prompt(_state(FORCED), USER, reasoning_format="none").thinking_forced_open


def test_reasoning_is_split_only_for_a_thinking_template():
    assert _prompt(_state(QWEN3), USER).reasoning_format == "auto"
    assert _prompt(_state(QWEN3, reasoning_format="deepseek"), USER).reasoning_format == "deepseek"
    assert _prompt(_state(None), USER).reasoning_format == "none"          # chatml: no thinking tags
    assert _prompt(_state("zephyr"), USER, reasoning_format="deepseek").reasoning_format == "none"


def test_add_generation_prompt_false_and_bos_text_dropped():
    t = "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}" \
        "{% if add_generation_prompt %}assistant:{% endif %}{{ eos_token }}"
    assert _prompt(_state(t), USER).text == "<s>user: Hi\nassistant:</s>"
    st = _state(t, _Tok(add_bos=True, add_eos=True))      # the tokenizer adds them: the text does not
    assert _prompt(st, USER).text == "user: Hi\nassistant:"
    assert _prompt(st, USER, add_generation_prompt=False).text == "user: Hi\n"


def test_continue_final_message_and_prefill():
    st = _state(None)                                      # chatml
    conv = [*USER, {"role": "assistant", "content": "Hello, I am"}]
    want = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello, I am"
    assert _prompt(st, conv, continue_final_message=True, add_generation_prompt=False).text == want
    assert _prompt(st, conv).text == want                  # prefill: the same continuation
    assert _prompt(st, conv).reasoning_format == "none"


def test_continuation_with_thinking_tags():
    # as common/chat.cpp: the generation prompt cut before its <think>, then <think> + the
    # message's reasoning, then </think> + its content when the content is continued
    st = _state(QWEN3)
    head = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    conv = [*USER, {"role": "assistant", "content": "Hello"}]
    assert _prompt(st, conv).text == head + "<think></think>Hello"
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    assert _prompt(st, conv, **off).text == head + "<think></think>Hello"
    thinking = [*USER, {"role": "assistant", "content": "", "reasoning_content": "Let me"}]
    p = _prompt(st, thinking)                               # true: the reasoning, as it has no content
    assert p.text == head + "<think>Let me" and p.thinking_forced_open and p.reasoning_format == "auto"
    both = [*USER, {"role": "assistant", "content": "Hi", "reasoning_content": "greet"}]
    p = _prompt(st, both, continue_final_message="reasoning_content", add_generation_prompt=False)
    assert p.text == head + "<think>greet" and p.thinking_forced_open
    p = _prompt(st, both, continue_final_message="content", add_generation_prompt=False)
    assert p.text == head + "<think>greet</think>Hi" and not p.thinking_forced_open


def test_chat_option_400s():
    st = _state(None)
    conv = [*USER, {"role": "assistant", "content": "Hello"}]
    assert "Cannot set both add_generation_prompt and continue_final_message" in _400(st, conv, continue_final_message=True)
    assert "Cannot set both" in _400(st, conv, continue_final_message=True, add_generation_prompt=True)
    assert "last message" in _400(st, USER, continue_final_message=True, add_generation_prompt=False)
    assert "2 or more assistant" in _400(st, [*conv, {"role": "assistant", "content": "again"}])
    calls = [*USER, {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}]
    assert "tool calls" in _400(st, calls)
    assert "must be a boolean" in _400(st, USER, add_generation_prompt="yes")
    assert "continue_final_message" in _400(st, conv, continue_final_message="maybe", add_generation_prompt=False)
    assert "reasoning_format" in _400(st, USER, reasoning_format="loud")
    assert "enable_thinking" in _400(st, USER, chat_template_kwargs={"enable_thinking": "false"})
    assert "reasoning_effort" in _400(st, USER, reasoning_effort=3)


# -- --chat-template at startup --------------------------------------------------------------------
def _settings(*argv):
    return settings_from_args(build_parser().parse_args(["-m", __file__, *argv]))


@pytest.mark.parametrize("name", ["chatml", "llama2", "llama3", "mistral-v7", "phi3", "zephyr", "gemma",
                                  "command-r", "deepseek", "deepseek3", "vicuna", "granite"])
def test_builtin_names_select_the_template(name):
    s = _settings("--chat-template", name)
    assert s.chat_template == name
    assert render_chat(s.chat_template, USER) != render_chat("chatml", USER) or name == "chatml"


def test_zephyr_by_name_renders_zephyr():
    assert render_chat(_settings("--chat-template", "zephyr").chat_template, USER) == \
        "<|user|>\nHi<|endoftext|>\n<|assistant|>\n"


def test_bad_templates_are_startup_errors(tmp_path):
    with pytest.raises(CLIError, match=r"unknown chat template name 'qwen9'.*chatml, llama2"):
        _settings("--chat-template", "qwen9")
    with pytest.raises(CLIError, match="--chat-template: chat template does not compile"):
        _settings("--chat-template", "{% for m in messages %}{{ m.content }}")
    f = tmp_path / "t.jinja"
    f.write_text("{% if %}")
    with pytest.raises(CLIError, match="--chat-template-file: chat template does not compile"):
        _settings("--chat-template-file", str(f))
    f.write_text(QWEN3)
    assert _settings("--chat-template-file", str(f)).chat_template == QWEN3
    with pytest.raises(CLIError, match="JSON object"):
        _settings("--chat-template-kwargs", "[1]")
    s = _settings("--chat-template-kwargs", '{"enable_thinking": false}', "--reasoning-format", "none",
                  "--reasoning-budget", "0")
    assert (s.chat_template_kwargs, s.reasoning_format, s.reasoning_budget) == ({"enable_thinking": False}, "none", 0)
    with pytest.raises(SystemExit):
        _settings("--reasoning-format", "loud")


# -- over HTTP ----------------------------------------------------------------------------------------
THOUGHT = "<think>\\nplan: say done\\n</think>\\n\\nDone."


@pytest.fixture(scope="module")
def http(tmp_path_factory):
    d = tmp_path_factory.mktemp("chatopts")
    write_model(d / "synth.gguf", n_layer=1, n_embd=64, n_head=2, n_head_kv=1, n_ff=128, seed=5)
    (d / "qwen3.jinja").write_text(QWEN3)
    srv, url = start_server(["-m", str(d / "synth.gguf"), "-c", "512", "-np", "2",
                             "--chat-template-file", str(d / "qwen3.jinja")])
    with httpx.Client(base_url=url, timeout=60) as c:
        yield c
    srv.stop()


def _chat(http, **body):
    body = {"messages": USER, "temperature": 0, "max_tokens": 40, "grammar": f'root ::= "{THOUGHT}"', **body}
    return http.post("/v1/chat/completions", json=body)


def test_apply_template_over_http(http):
    r = http.post("/apply-template", json={"messages": USER, "add_generation_prompt": False})
    assert r.json() == {"prompt": "<|im_start|>user\nHi<|im_end|>\n"}
    r = http.post("/apply-template", json={"messages": USER, "chat_template_kwargs": {"enable_thinking": False}})
    assert r.json()["prompt"].endswith("<think>\n\n</think>\n\n")
    r = http.post("/apply-template", json={"messages": USER, "continue_final_message": True})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("bad,words", [
    ({"messages": [{"content": "x"}]}, "role"),
    ({"messages": [{"role": "user"}]}, "content"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "wizard"),
    ({"messages": [*USER, {"role": "assistant", "content": "a"}], "continue_final_message": True},
     "continue_final_message"),
])
def test_chat_400s_over_http(http, bad, words):
    r = http.post("/v1/chat/completions", json=bad)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == 400 and err["type"] == "invalid_request_error" and words in err["message"]


def test_reasoning_split_over_http(http):
    msg = _chat(http).json()["choices"][0]["message"]
    assert msg["reasoning_content"] == "plan: say done" and msg["content"] == "Done."
    inline = _chat(http, reasoning_format="none").json()["choices"][0]["message"]
    assert inline["content"] == "<think>\nplan: say done\n</think>\n\nDone." and "reasoning_content" not in inline
    with http.stream("POST", "/v1/chat/completions", json={
            "messages": USER, "temperature": 0, "max_tokens": 40, "stream": True,
            "grammar": f'root ::= "{THOUGHT}"'}) as s:
        events = [e for e in sse_events(s.iter_lines()) if isinstance(e, dict) and e["choices"]]
    deltas = [e["choices"][0]["delta"] for e in events[1:]]
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content") or "" for d in deltas)
    assert (reasoning, content) == ("plan: say done", "Done.")
    assert all("<" not in (d.get("content") or "") for d in deltas)    # no tag text leaks into content
    assert any("reasoning_content" in d for d in deltas)
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_reasoning_streamed_when_the_prompt_opens_the_block(http):
    # the template writes '<think>\n' into the prompt: the reply starts inside the thinking block
    body = {"messages": USER, "temperature": 0, "max_tokens": 40, "stream": True,
            "chat_template_kwargs": {"open_think": True}, "grammar": 'root ::= "plan: say done\\n</think>\\n\\nDone."'}
    assert http.post("/apply-template", json=body).json()["prompt"].endswith("assistant\n<think>\n")
    with http.stream("POST", "/v1/chat/completions", json=body) as s:
        deltas = [e["choices"][0]["delta"] for e in sse_events(s.iter_lines())
                  if isinstance(e, dict) and e["choices"]][1:]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "plan: say done"
    assert "".join(d.get("content") or "" for d in deltas) == "Done."
    msg = http.post("/v1/chat/completions", json={**body, "stream": False}).json()["choices"][0]["message"]
    assert (msg["reasoning_content"], msg["content"]) == ("plan: say done", "Done.")


def test_smollm2_template_prefill_and_no_generation_prompt():
    from pathlib import Path

    model = Path(__file__).resolve().parent.parent / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not model.exists():
        pytest.skip(f"{model.name} is absent (scripts/get-model.sh fetches it)")
    from gguf import GGUFReader

    st = _state(GGUFReader(str(model)).fields["tokenizer.chat_template"].contents())
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    assert not supports_thinking(st.chat_template)         # no <think> written into a continuation
    assert _prompt(st, USER, add_generation_prompt=False).text == system + "<|im_start|>user\nHi<|im_end|>\n"
    conv = [*USER, {"role": "assistant", "content": "Hello"}]
    want = system + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello"
    assert _prompt(st, conv).text == want == _prompt(st, conv, continue_final_message=True,
                                                     add_generation_prompt=False).text
