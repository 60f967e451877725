"""llama.cpp's built-in chat templates, by the names ``--chat-template`` accepts (llama-chat.cpp's
``LLM_CHAT_TEMPLATES``), rendered as llama_chat_apply_template renders them: plain string code,
no Jinja. ``--chat-template gemma`` serves a GGUF that carries no ``tokenizer.chat_template``
(Gemma 3 270M, a base model); checked against libllama's own output in tests/test_chat_builtin.py.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

Renderer = Callable[[list[tuple[str, str]], bool], str]


def _trim(s: str) -> str:
    return s.strip(" \t\n\r\f\v")   # llama.cpp's trim(): std::isspace


def _chatml(chat: list[tuple[str, str]], add_ass: bool) -> str:
    out = "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in chat)
    return out + ("<|im_start|>assistant\n" if add_ass else "")


def _llama2(system: bool, bos_inside: bool = False, strip: bool = False) -> Renderer:
    def render(chat: list[tuple[str, str]], add_ass: bool) -> str:
        out, inside = "[INST] ", True
        for role, content in chat:
            content = _trim(content) if strip else content
            if not inside:
                inside = True
                out += "<s>[INST] " if bos_inside else "[INST] "
            if role == "system":
                out += f"<<SYS>>\n{content}\n<</SYS>>\n\n" if system else content + "\n"
            elif role == "user":
                out += content + " [/INST]"
            else:
                out += content + "</s>"
                inside = False
        return out
    return render


def _mistral(leading: str, trailing: str, trim_assistant: bool) -> Renderer:
    def render(chat: list[tuple[str, str]], add_ass: bool) -> str:
        out, inside = "", False
        for role, content in chat:
            if not inside:
                out += f"{leading}[INST]{trailing}"
                inside = True
            if role == "system":
                out += content + "\n\n"
            elif role == "user":
                out += content + leading + "[/INST]"
            else:
                out += trailing + (_trim(content) if trim_assistant else content) + "</s>"
                inside = False
        return out
    return render


def _mistral_v7(space: str) -> Renderer:
    def render(chat: list[tuple[str, str]], add_ass: bool) -> str:
        out = ""
        for role, content in chat:
            if role == "system":
                out += f"[SYSTEM_PROMPT]{space}{content}[/SYSTEM_PROMPT]"
            elif role == "user":
                out += f"[INST]{space}{content}[/INST]"
            else:
                out += f"{space}{content}</s>"
        return out
    return render


def _llama3(chat: list[tuple[str, str]], add_ass: bool) -> str:
    out = "".join(f"<|start_header_id|>{r}<|end_header_id|>\n\n{_trim(c)}<|eot_id|>" for r, c in chat)
    return out + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_ass else "")


def _gemma(chat: list[tuple[str, str]], add_ass: bool) -> str:
    out, system = "", ""
    for role, content in chat:
        if role == "system":        # no system turn in Gemma: merged into the next user turn
            system += _trim(content)
            continue
        role = "model" if role == "assistant" else role
        out += f"<start_of_turn>{role}\n"
        if system and role != "model":
            out += system + "\n\n"
            system = ""
        out += _trim(content) + "<end_of_turn>\n"
    return out + ("<start_of_turn>model\n" if add_ass else "")


def _phi3(chat: list[tuple[str, str]], add_ass: bool) -> str:
    out = "".join(f"<|{r}|>\n{c}<|end|>\n" for r, c in chat)
    return out + ("<|assistant|>\n" if add_ass else "")


_COMMAND_R_ROLES = {"system": "<|SYSTEM_TOKEN|>", "user": "<|USER_TOKEN|>", "assistant": "<|CHATBOT_TOKEN|>"}


def _command_r(chat: list[tuple[str, str]], add_ass: bool) -> str:
    out = "".join(f"<|START_OF_TURN_TOKEN|>{_COMMAND_R_ROLES[r]}{_trim(c)}<|END_OF_TURN_TOKEN|>"
                  for r, c in chat if r in _COMMAND_R_ROLES)
    return out + ("<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>" if add_ass else "")


def _deepseek3(chat: list[tuple[str, str]], add_ass: bool) -> str:
    out = ""
    for role, content in chat:
        if role == "system":
            out += content + "\n\n"
        elif role == "user":
            out += "<｜User｜>" + content
        elif role == "assistant":
            out += "<｜Assistant｜>" + content + "<｜end▁of▁sentence｜>"
    return out + ("<｜Assistant｜>" if add_ass else "")


def _simple(turn: str, gen: str, prefix: str = "", trim: bool = False) -> Renderer:
    """Each message as ``turn`` with {role} and {content}, then ``gen`` when a reply is asked for."""
    def render(chat: list[tuple[str, str]], add_ass: bool) -> str:
        return prefix + "".join(turn.format(role=r, content=_trim(c) if trim else c) for r, c in chat) \
            + (gen if add_ass else "")
    return render


def _by_role(turns: dict[str, str], gen: str, trim: bool = False) -> Renderer:
    """Each message through its role's format (roles not listed are skipped)."""
    def render(chat: list[tuple[str, str]], add_ass: bool) -> str:
        return "".join(turns[r].format(content=_trim(c) if trim else c) for r, c in chat if r in turns) \
            + (gen if add_ass else "")
    return render


def _monarch(chat: list[tuple[str, str]], add_ass: bool) -> str:
    out = "".join(("" if i == 0 else "<s>") + f"{r}\n{c}</s>\n" for i, (r, c) in enumerate(chat))
    return out + ("<s>assistant\n" if add_ass else "")


def _orion(chat: list[tuple[str, str]], add_ass: bool) -> str:
    out, system = "", ""
    for role, content in chat:
        if role == "system":
            system += content
        elif role == "user":
            out += "Human: " + (system + "\n\n" if system else "") + content + "\n\nAssistant: </s>"
            system = ""
        else:
            out += content + "</s>"
    return out


def _openchat(chat: list[tuple[str, str]], add_ass: bool) -> str:
    out = "".join(f"{c}<|end_of_turn|>" if r == "system" else f"GPT4 Correct {r[:1].upper()}{r[1:]}: {c}<|end_of_turn|>"
                  for r, c in chat)
    return out + ("GPT4 Correct Assistant:" if add_ass else "")


def _minicpm(chat: list[tuple[str, str]], add_ass: bool) -> str:
    return "".join(f"<用户>{_trim(c)}<AI>" if r == "user" else _trim(c) for r, c in chat)


def _rwkv_world(chat: list[tuple[str, str]], add_ass: bool) -> str:
    out = ""
    for i, (role, content) in enumerate(chat):
        if role == "system":
            out += f"System: {_trim(content)}\n\n"
        elif role == "user":
            out += f"User: {_trim(content)}\n\n" + ("Assistant:" if i == len(chat) - 1 else "")
        elif role == "assistant":
            out += f"Assistant: {_trim(content)}\n\n"
    return out


def _gigachat(chat: list[tuple[str, str]], add_ass: bool) -> str:
    has_system = bool(chat) and chat[0][0] == "system"
    out = f"<s>{chat[0][1]}<|message_sep|>" if has_system else "<s>"
    for role, content in chat[1 if has_system else 0:]:
        if role == "user":
            out += f"user<|role_sep|>{content}<|message_sep|>available functions<|role_sep|>[]<|message_sep|>"
        elif role == "assistant":
            out += f"assistant<|role_sep|>{content}<|message_sep|>"
    return out + ("assistant<|role_sep|>" if add_ass else "")


def _smolvlm(chat: list[tuple[str, str]], add_ass: bool) -> str:
    out = "<|im_start|>"
    for role, content in chat:
        if role == "system":
            out += content + "\n\n"
        elif role == "user":
            out += f"User: {content}<end_of_utterance>\n"
        else:
            out += f"Assistant: {content}<end_of_utterance>\n"
    return out + ("Assistant:" if add_ass else "")


def _vicuna(orca: bool) -> Renderer:
    return _by_role({"system": "SYSTEM: {content}\n" if orca else "{content}\n\n", "user": "USER: {content}\n",
                     "assistant": "ASSISTANT: {content}</s>\n"}, "ASSISTANT:")


_EXAONE = {"system": "[|system|]{content}[|endofturn|]\n", "user": "[|user|]{content}\n",
           "assistant": "[|assistant|]{content}[|endofturn|]\n"}


BUILTIN_TEMPLATES: dict[str, Renderer] = {
    "chatml": _chatml,
    "llama2": _llama2(system=False),
    "llama2-sys": _llama2(system=True),
    "llama2-sys-bos": _llama2(system=True, bos_inside=True),
    "llama2-sys-strip": _llama2(system=True, strip=True),
    "mistral-v1": _mistral(" ", " ", False),
    "mistral-v3": _mistral("", " ", True),
    "mistral-v3-tekken": _mistral("", "", False),
    "mistral-v7": _mistral_v7(" "),
    "mistral-v7-tekken": _mistral_v7(""),
    "llama3": _llama3,
    "gemma": _gemma,
    "phi3": _phi3,
    "command-r": _command_r,
    "deepseek3": _deepseek3,
    "phi4": _simple("<|im_start|>{role}<|im_sep|>{content}<|im_end|>", "<|im_start|>assistant<|im_sep|>"),
    "falcon3": _simple("<|{role}|>\n{content}\n", "<|assistant|>\n"),
    "zephyr": _simple("<|{role}|>\n{content}<|endoftext|>\n", "<|assistant|>\n"),
    "monarch": _monarch,
    "orion": _orion,
    "openchat": _openchat,
    "vicuna": _vicuna(orca=False),
    "vicuna-orca": _vicuna(orca=True),
    "deepseek": _by_role({"system": "{content}", "user": "### Instruction:\n{content}\n",
                          "assistant": "### Response:\n{content}\n<|EOT|>\n"}, "### Response:\n"),
    "deepseek2": _by_role({"system": "{content}\n\n", "user": "User: {content}\n\n",
                           "assistant": "Assistant: {content}<｜end▁of▁sentence｜>"}, "Assistant:"),
    "chatglm3": _simple("<|{role}|>\n {content}", "<|assistant|>", prefix="[gMASK]sop"),
    "chatglm4": _simple("<|{role}|>\n{content}", "<|assistant|>\n", prefix="[gMASK]<sop>"),
    "glmedge": _simple("<|{role}|>\n{content}", "<|assistant|>"),
    "minicpm": _minicpm,
    "exaone3": _by_role(_EXAONE, "[|assistant|]", trim=True),
    "exaone4": _by_role({**_EXAONE, "tool": "[|tool|]{content}[|endofturn|]\n"}, "[|assistant|]", trim=True),
    "rwkv-world": _rwkv_world,
    "granite": _simple("<|start_of_role|>{role}<|end_of_role|>{content}<|end_of_text|>\n",
                       "<|start_of_role|>assistant<|end_of_role|>"),
    "gigachat": _gigachat,
    "megrez": _simple("<|role_start|>{role}<|role_end|>{content}<|turn_end|>", "<|role_start|>assistant<|role_end|>"),
    "llama4": _simple("<|header_start|>{role}<|header_end|>\n\n{content}<|eot|>",
                      "<|header_start|>assistant<|header_end|>\n\n", trim=True),
    "smolvlm": _smolvlm,
}


def _text(content: Any) -> str:
    """A message's content as llama.cpp's server flattens it: a string, or the text parts joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return str(content)


def builtin_name(template: str | None) -> str | None:
    """The built-in template's name when `template` is one (surrounding whitespace ignored)."""
    if not template:
        return None
    name = template.strip()
    return name if name in BUILTIN_TEMPLATES else None


def render_builtin(name: str, messages: list[dict], add_generation_prompt: bool) -> str:
    chat = [(str(m.get("role", "")), _text(m.get("content"))) for m in messages]
    return BUILTIN_TEMPLATES[name](chat, add_generation_prompt)
