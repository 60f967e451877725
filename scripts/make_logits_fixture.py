#!/usr/bin/env python3
"""Make the reference-logits fixture for the real test model, with an INDEPENDENT engine.

What it does
------------
Loads models/SmolLM2-135M-Instruct.Q4_1.gguf with HF transformers + torch (CPU, float32,
eager attention, eval mode, no_grad).  transformers dequantizes the GGUF tensors (Q8_0
token_embd, Q4_1 matrices, F32 norms) to float32 itself and undoes llama.cpp's q/k row
permutation.  For a handful of prompts (no digits in any of them, see below) it writes:

  tests/fixtures/smollm2_ref_logits.npy  float32 [n_prompts, 49152]: full-vocab logits at
                                         the LAST prompt position (one forward over the
                                         whole prompt, no BOS added).
  tests/fixtures/smollm2_ref.json        model name + sha256, library versions, and per
                                         prompt: text, token ids, last-position top-5,
                                         greedy 32-token continuation (plain argmax loop
                                         over the KV cache, never stops early, EOS included
                                         if it comes up) with its text, the top-1 minus
                                         top-2 logit margin at every greedy step and the
                                         minimum of those, and the max-abs difference of
                                         the last-position logits computed a second way
                                         (prefill all but the last token, then one cached
                                         decode step) as a measure of float32 noise.

Sanity checks made before anything is written (the script fails loudly otherwise):
  * every HF parameter equals gguf-py's own numpy dequantization of the matching GGUF
    tensor (q/k after undoing llama.cpp's permutation), so the loader dequantized right;
  * the greedy continuation of "The capital of France is" starts with " Paris" (a wrong
    q/k permutation gives gibberish);
  * <|im_start|> / <|im_end|> tokenize to single ids (1 / 2), ids decode back to the text;
  * the hand-written greedy loop matches model.generate(do_sample=False).

Why no digits: llama.cpp's 'smollm' pre-tokenizer splits digits one by one, the tokenizer
transformers builds from the GGUF does not; without digits the two agree, so the stored ids
are what llama.cpp would produce for the same text.  Consumers should feed the stored ids
directly anyway.

How to run (from the repo root; takes about a minute on 2 cores):
  python -m venv /work/torchenv
  /work/torchenv/bin/pip install torch==2.13.0 transformers gguf numpy sentencepiece \
      protobuf accelerate
  bash scripts/get-model.sh
  /work/torchenv/bin/python scripts/make_logits_fixture.py [--models-dir models] [--out-dir tests/fixtures]

Pinned versions it was run with (also recorded in the json):
  torch 2.13.0+cpu, transformers 5.23.0, gguf 0.19.0, numpy 2.4.6, tokenizers 0.23.3,
  accelerate 1.15.0, Python 3.11.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
N_GREEDY = 32
TOPK = 5

PROMPTS: list[tuple[str, str]] = [
    ("capital", "The capital of France is"),
    (
        "chatml",
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nWhat is gravity?<|im_end|>\n<|im_start|>assistant\n",
    ),
    (
        "code",
        "def reverse_words(sentence):\n    words = sentence.split()\n    return ",
    ),
    (
        "long_prose",
        "The old lighthouse stood at the edge of the cliff, its white paint peeling after years of "
        "salt wind and winter storms. Every evening the keeper climbed the narrow spiral stairs, "
        "carrying a lantern and a small notebook in which he recorded the weather, the ships that "
        "passed, and anything unusual he noticed on the water. Most nights were quiet. The waves "
        "rolled in slowly, the gulls settled on the rocks below, and the beam of light swept across "
        "the dark sea in long, patient circles. But the keeper had learned that the sea was never "
        "truly calm; it only rested between moods. One autumn night, a thick fog rolled in from the "
        "south, so dense that he could barely see the railing of the gallery. He heard, somewhere "
        "far out in the grey, the low call of a ship's horn, then another, closer this time. He "
        "checked the lamp, wound the clockwork that turned the lens, and began to sound the fog "
        "bell by hand, pulling the rope in a slow and steady rhythm. For hours he kept at it, his "
        "arms aching and his breath turning to mist in the cold air. When dawn finally broke and "
        "the fog began to lift, he saw a fishing boat anchored safely in the bay, its crew waving "
        "up at the tower. He waved back, went down the stairs, and wrote a single line in his "
        "notebook before he",
    ),
]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp convert_hf_to_gguf's q/k row permutation (rows = output features).

    The converter stores permute(w) = w.reshape(n_head, 2, rows//n_head//2, ...).swapaxes(1, 2);
    its inverse swaps the same two axes of the other grouping.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_weights_against_gguf(model, gguf_path: Path, cfg) -> dict:
    """Compare every HF parameter with gguf-py's numpy dequantization of the GGUF tensor."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    params = dict(model.named_parameters())
    per_layer = {
        "attn_norm": "input_layernorm.weight",
        "ffn_norm": "post_attention_layernorm.weight",
        "attn_q": "self_attn.q_proj.weight",
        "attn_k": "self_attn.k_proj.weight",
        "attn_v": "self_attn.v_proj.weight",
        "attn_output": "self_attn.o_proj.weight",
        "ffn_gate": "mlp.gate_proj.weight",
        "ffn_up": "mlp.up_proj.weight",
        "ffn_down": "mlp.down_proj.weight",
    }
    worst = 0.0
    seen = 0
    types: dict[str, int] = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])  # ggml ne[] is innermost-first
        name = t.name
        if name == "token_embd.weight":
            hf = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            hf = "model.norm.weight"
        elif name.startswith("blk."):
            _, layer, kind, _ = name.split(".")
            hf = f"model.layers.{layer}.{per_layer[kind]}"
            if kind == "attn_q":
                w = unpermute(w, cfg.num_attention_heads)
            elif kind == "attn_k":
                w = unpermute(w, cfg.num_key_value_heads)
        else:
            raise SystemExit(f"unexpected tensor {name}")
        p = params[hf].detach().numpy()
        if p.shape != w.shape:
            raise SystemExit(f"{name}: shape {w.shape} vs HF {hf} {p.shape}")
        d = float(np.max(np.abs(p - w)))
        worst = max(worst, d)
        seen += 1
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    if seen != len(params) or worst != 0.0:
        raise SystemExit(f"weights differ from gguf-py dequant: compared {seen}/{len(params)}, max-abs {worst}")
    # tied embeddings: no output.weight in the file, lm_head must be token_embd
    if not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight):
        raise SystemExit("lm_head is not tied to embed_tokens")
    return {"tensors_compared": seen, "tensor_types": types, "max_abs_vs_gguf_py_dequant": worst}


def compact_json(obj) -> str:
    """Indented JSON, but lists of numbers and small flat dicts kept on one line."""
    def flat(x) -> bool:
        if isinstance(x, list):
            return all(isinstance(v, (int, float)) for v in x)
        if isinstance(x, dict):
            return len(x) <= 4 and all(isinstance(v, (int, float, str, list)) and flat_scalar(v) for v in x.values())
        return False

    def flat_scalar(v) -> bool:
        return not isinstance(v, list) or all(isinstance(e, (int, float)) for e in v)

    def enc(x, ind: int) -> str:
        if flat(x) or not isinstance(x, (list, dict)):
            return json.dumps(x, ensure_ascii=False)
        pad, pad1 = " " * ind, " " * (ind + 1)
        if isinstance(x, list):
            return "[\n" + ",\n".join(pad1 + enc(v, ind + 1) for v in x) + "\n" + pad + "]"
        return "{\n" + ",\n".join(f"{pad1}{json.dumps(k)}: {enc(v, ind + 1)}" for k, v in x.items()) + "\n" + pad + "}"

    return enc(obj, 0)


@torch.no_grad()
def last_logits_full(model, ids: list[int]) -> torch.Tensor:
    out = model(torch.tensor([ids]), use_cache=False)
    return out.logits[0, -1].float()


@torch.no_grad()
def last_logits_incremental(model, ids: list[int]) -> torch.Tensor:
    out = model(torch.tensor([ids[:-1]]), use_cache=True)
    out = model(torch.tensor([ids[-1:]]), past_key_values=out.past_key_values, use_cache=True)
    return out.logits[0, -1].float()


def topk_info(logits: torch.Tensor, tok) -> list[dict]:
    v, i = torch.topk(logits, TOPK)
    return [
        {"id": int(a), "logit": float(b), "piece": tok.convert_ids_to_tokens(int(a))}
        for a, b in zip(i.tolist(), v.tolist())
    ]


@torch.no_grad()
def greedy(model, ids: list[int], tok) -> dict:
    """Plain argmax loop over the KV cache; always exactly N_GREEDY tokens."""
    out = model(torch.tensor([ids]), use_cache=True)
    past = out.past_key_values
    logits = out.logits[0, -1].float()
    gen, margins, steps = [], [], []
    for step in range(N_GREEDY):
        v, i = torch.topk(logits, TOPK)
        nxt = int(i[0])
        margins.append(float(v[0] - v[1]))
        steps.append({"top_ids": [int(x) for x in i.tolist()], "top_logits": [float(x) for x in v.tolist()]})
        gen.append(nxt)
        if step == N_GREEDY - 1:
            break
        out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[0, -1].float()
    # cross-check against transformers' own greedy search
    ref = model.generate(
        torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=N_GREEDY, min_new_tokens=N_GREEDY, do_sample=False,
        eos_token_id=None, pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 2,
    )[0, len(ids):].tolist()
    return {
        "greedy_ids": gen,
        "greedy_text": tok.decode(gen, skip_special_tokens=False),
        "greedy_margins": margins,
        "min_greedy_margin": min(margins),
        "min_greedy_margin_step": int(np.argmin(margins)),
        "greedy_top5": steps,
        "generate_agrees": ref == gen,
        "generate_ids": ref if ref != gen else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    root = Path(__file__).resolve().parent.parent
    ap.add_argument("--models-dir", default=str(root / "models"))
    ap.add_argument("--out-dir", default=str(root / "tests" / "fixtures"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    t0 = time.time()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    models_dir = Path(args.models_dir)
    gguf_path = models_dir / MODEL_NAME
    model = AutoModelForCausalLM.from_pretrained(
        str(models_dir), gguf_file=MODEL_NAME, dtype=torch.float32, attn_implementation="eager"
    )
    model.to("cpu").eval()
    tok = AutoTokenizer.from_pretrained(str(models_dir), gguf_file=MODEL_NAME)
    cfg = model.config
    t_load = time.time() - t0
    print(f"loaded in {t_load:.1f}s: {type(model).__name__}, {cfg.num_hidden_layers} layers, "
          f"dim {cfg.hidden_size}, heads {cfg.num_attention_heads}/{cfg.num_key_value_heads}", flush=True)

    assert cfg.model_type == "llama" and cfg.vocab_size == 49152 and cfg.num_hidden_layers == 30
    assert cfg.hidden_size == 576 and cfg.num_attention_heads == 9 and cfg.num_key_value_heads == 3
    assert model.dtype == torch.float32 and cfg._attn_implementation == "eager"

    weights = check_weights_against_gguf(model, gguf_path, cfg)
    print(f"weights: {weights}", flush=True)

    special = {s: tok.convert_tokens_to_ids(s) for s in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")}
    assert special["<|im_start|>"] == 1 and special["<|im_end|>"] == 2, special

    records, all_logits = [], []
    for key, text in PROMPTS:
        assert not any(c.isdigit() for c in text), f"prompt {key} has digits"
        ids = tok(text, add_special_tokens=False)["input_ids"]
        ids_default = tok(text)["input_ids"]
        assert ids == ids_default, f"{key}: tokenizer adds special tokens by default"
        assert tok.decode(ids) == text, f"{key}: ids do not decode back to the prompt"
        if "<|im_start|>" in text:
            assert ids.count(1) == text.count("<|im_start|>") and ids.count(2) == text.count("<|im_end|>"), ids
        tp = time.time()
        full = last_logits_full(model, ids)
        inc = last_logits_incremental(model, ids)
        g = greedy(model, ids, tok)
        # step 0 of the greedy loop (cached prefill) must pick the same token as the full forward
        assert int(torch.argmax(full)) == g["greedy_ids"][0]
        rec = {
            "name": key,
            "text": text,
            "n_tokens": len(ids),
            "ids": ids,
            "last_top5": topk_info(full, tok),
            "incremental_vs_full_max_abs": float((inc - full).abs().max()),
            **g,
            "seconds": round(time.time() - tp, 2),
        }
        records.append(rec)
        all_logits.append(full.numpy().astype(np.float32))
        print(f"[{key}] {len(ids)} tokens, inc-vs-full max-abs {rec['incremental_vs_full_max_abs']:.3g}, "
              f"min margin {rec['min_greedy_margin']:.4f} @step {rec['min_greedy_margin_step']}, "
              f"generate agrees {rec['generate_agrees']}\n    -> {rec['greedy_text']!r}", flush=True)

    first = records[0]["greedy_text"]
    if not first.lstrip().startswith("Paris"):
        raise SystemExit(f"greedy continuation of the capital prompt is {first!r}: q/k permutation likely wrong")
    if not all(r["generate_agrees"] for r in records):
        raise SystemExit("hand-written greedy loop disagrees with model.generate")

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    logits = np.stack(all_logits).astype(np.float32)
    assert logits.shape == (len(PROMPTS), cfg.vocab_size) and np.isfinite(logits).all()
    np.save(out_dir / "smollm2_ref_logits.npy", logits)

    meta = {
        "description": "Last-position float32 logits and greedy continuations for the real model, computed "
                       "independently with HF transformers + torch (CPU, float32, eager attention) loading the "
                       "GGUF. Row i of smollm2_ref_logits.npy belongs to prompts[i]. Made by "
                       "scripts/make_logits_fixture.py.",
        "model_file": MODEL_NAME,
        "model_sha256": sha256_of(gguf_path),
        "logits_file": "smollm2_ref_logits.npy",
        "logits_shape": list(logits.shape),
        "add_bos": False,
        "n_greedy": N_GREEDY,
        "greedy_note": "argmax at every step over the KV cache, no EOS stopping; greedy_margins[k] = "
                       "logit[top1]-logit[top2] before emitting greedy_ids[k]; greedy_margins[0] comes from "
                       "the same prompt forward as the stored logits row.",
        "incremental_note": "incremental_vs_full_max_abs = max |logits(prefill ids[:-1] then one cached step on "
                            "ids[-1]) - logits(one forward over all ids)| at the last position: float32 noise "
                            "between two exact-arithmetic-equal computations.",
        "engine": {
            "attn_implementation": cfg._attn_implementation,
            "dtype": "float32",
            "device": "cpu",
            "torch_threads": torch.get_num_threads(),
            "rms_norm_eps": cfg.rms_norm_eps,
            "rope_theta": (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", None)),
        },
        "weights_check": weights,
        "special_token_ids": special,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": version("transformers"),
            "gguf": version("gguf"),
            "numpy": np.__version__,
            "tokenizers": version("tokenizers"),
            "accelerate": version("accelerate"),
        },
        "max_incremental_vs_full_max_abs": max(r["incremental_vs_full_max_abs"] for r in records),
        "run_seconds": None,
        "prompts": records,
    }
    meta["run_seconds"] = round(time.time() - t0, 1)
    with open(out_dir / "smollm2_ref.json", "w") as f:
        f.write(compact_json(meta) + "\n")
    print(f"wrote {out_dir / 'smollm2_ref.json'} and {out_dir / 'smollm2_ref_logits.npy'} "
          f"in {meta['run_seconds']}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
