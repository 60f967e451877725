#!/usr/bin/env python3
"""Write tests/fixtures/chat_builtin.json: llama.cpp's own rendering of its built-in chat templates
(llama_chat_apply_template in libllama, called through ctypes; no model needed) for a few
conversations, for tests/test_chat_builtin.py to compare frontend/model/chat_builtin.py against.

    python scripts/make_chat_template_fixture.py [--lib /root/llamacpp/build/bin/libllama.so]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
NAMES = ["chatml", "llama2", "llama2-sys", "llama2-sys-bos", "llama2-sys-strip", "mistral-v1", "mistral-v3",
         "mistral-v3-tekken", "mistral-v7", "mistral-v7-tekken", "llama3", "gemma", "phi3", "command-r", "deepseek3",
         "phi4", "falcon3", "zephyr", "monarch", "orion", "openchat", "vicuna", "vicuna-orca", "deepseek", "deepseek2",
         "chatglm3", "chatglm4", "glmedge", "minicpm", "exaone3", "exaone4", "rwkv-world", "granite", "gigachat",
         "megrez", "llama4", "smolvlm"]
CHATS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "You are helpful. "}, {"role": "user", "content": " Hi there\n"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": " 4 "}, {"role": "user", "content": "And 3+3?"}],
    [{"role": "user", "content": "héllo 😀"}, {"role": "assistant", "content": "hi"}],
]


class Msg(ctypes.Structure):
    _fields_ = [("role", ctypes.c_char_p), ("content", ctypes.c_char_p)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", default="/root/llamacpp/build/bin/libllama.so")
    ap.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "chat_builtin.json"))
    args = ap.parse_args()
    lib = ctypes.CDLL(args.lib)
    f = lib.llama_chat_apply_template
    f.restype = ctypes.c_int32
    f.argtypes = [ctypes.c_char_p, ctypes.POINTER(Msg), ctypes.c_size_t, ctypes.c_bool, ctypes.c_char_p, ctypes.c_int32]
    cases = []
    for name in NAMES:
        for chat in CHATS:
            for add_ass in (False, True):
                msgs = (Msg * len(chat))(*[Msg(m["role"].encode(), m["content"].encode()) for m in chat])
                buf = ctypes.create_string_buffer(1 << 16)
                n = f(name.encode(), msgs, len(chat), add_ass, buf, len(buf))
                if n < 0:
                    raise SystemExit(f"{name}: llama_chat_apply_template returned {n}")
                cases.append({"name": name, "add_ass": add_ass, "messages": chat, "text": buf.raw[:n].decode()})
    Path(args.out).write_text(json.dumps({"generator": "scripts/make_chat_template_fixture.py (libllama "
                                          "llama_chat_apply_template)", "cases": cases}, ensure_ascii=False, indent=0) + "\n")
    print(f"wrote {len(cases)} cases to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
