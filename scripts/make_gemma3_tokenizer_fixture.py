"""Write tests/fixtures/tokenizer_gemma3.json: llama.cpp's tokenization of the tokenizer corpus
(scripts/make_tokenizer_fixture.py's strings) with Gemma 3's vocabulary, through a running
llama-server's POST /tokenize (llama-cpp-python is not needed):

    llama-server -m models/gemma-3-270m-q4_k_m.gguf --port 18099 &
    python scripts/make_gemma3_tokenizer_fixture.py
"""
import json, sys, urllib.request
sys.path.insert(0, 'scripts'); sys.path.insert(0, 'tests')
from make_tokenizer_fixture import all_strings
def tok(s, special, add):
    r = urllib.request.urlopen(urllib.request.Request("http://127.0.0.1:18099/tokenize", json.dumps(
        {"content": s, "parse_special": special, "add_special": add}).encode(), {"Content-Type": "application/json"}))
    return json.loads(r.read())["tokens"]
cases = []
for i, s in enumerate(all_strings() + ["<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n", "<bos>x<eos>", "<pad> <mask>"]):
    c = {"text": s, "ids": tok(s, True, False)}
    p = tok(s, False, False)
    if p != c["ids"]: c["ids_plain"] = p
    if i < 25: c["ids_add_special"] = tok(s, True, True)
    cases.append(c)
json.dump({"name": "gemma3", "source": "models/gemma-3-270m-q4_k_m.gguf",
           "generator": "llama.cpp's llama-server POST /tokenize (parse_special on/off, add_special), scripts/make_tokenizer_fixture.py's strings",
           "cases": cases}, open("tests/fixtures/tokenizer_gemma3.json", "w"), ensure_ascii=False, indent=0)
print(len(cases))
