#!/usr/bin/env python3
"""Write tests/fixtures/tokenizer_gemma3.json: llama.cpp's tokenization of the tokenizer corpus
(scripts/make_tokenizer_fixture.py's strings) with Gemma 3's vocabulary, through a running
llama-server's POST /tokenize (llama-cpp-python is not needed):

    llama-server -m models/gemma-3-270m-q4_k_m.gguf --port 18099 --no-repack &
    python scripts/make_gemma3_tokenizer_fixture.py [--url http://127.0.0.1:18099]
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from make_tokenizer_fixture import all_strings  # noqa: E402

EXTRA = ["<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n", "<bos>x<eos>", "<pad> <mask>"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:18099")
    ap.add_argument("--out", default=str(HERE.parent / "tests" / "fixtures" / "tokenizer_gemma3.json"))
    args = ap.parse_args()

    def tok(s: str, special: bool, add: bool) -> list[int]:
        body = json.dumps({"content": s, "parse_special": special, "add_special": add}).encode()
        req = urllib.request.Request(args.url + "/tokenize", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req) as r:
            return json.loads(r.read())["tokens"]

    cases = []
    for i, s in enumerate(all_strings() + EXTRA):
        c = {"text": s, "ids": tok(s, True, False)}
        plain = tok(s, False, False)
        if plain != c["ids"]:
            c["ids_plain"] = plain
        if i < 25:
            c["ids_add_special"] = tok(s, True, True)
        cases.append(c)
    fx = {"name": "gemma3", "source": "models/gemma-3-270m-q4_k_m.gguf",
          "generator": "llama.cpp's llama-server POST /tokenize (parse_special on/off, add_special), "
                       "scripts/make_tokenizer_fixture.py's strings", "cases": cases}
    Path(args.out).write_text(json.dumps(fx, ensure_ascii=False, indent=0))
    print(f"wrote {len(cases)} cases to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
