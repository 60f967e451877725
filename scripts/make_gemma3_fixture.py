#!/usr/bin/env python3
"""Make the reference-logits fixture for Gemma 3 270M (models/gemma-3-270m-q4_k_m.gguf), with an
INDEPENDENT engine: HF transformers + torch (CPU, float32, eager attention so the 512-token sliding
window is applied exactly) loading the same GGUF as Gemma3ForCausalLM.

Writes tests/fixtures/gemma3_ref_logits.npy (float32 [n_prompts, 262144]: the last prompt
position's logits, one forward over the whole prompt, BOS first as llama.cpp adds it) and
tests/fixtures/gemma3_ref.json (model sha256, versions, per prompt: text, ids, last top-5, the
greedy 32-token continuation over the KV cache with its margins, the incremental-vs-full float32
noise, and for the long prompt how much the sliding window changes the logits).

Checks before writing: every HF parameter equals gguf-py's dequantization of its GGUF tensor
(norm weights as GGUF's 1 + w), the hand-written greedy loop equals model.generate, and the long
prompt is longer than the window.

Run (from the repo root, a Python with torch, transformers 5.x, accelerate, gguf; ~2 min):
  python -m venv /tmp/fixvenv && /tmp/fixvenv/bin/pip install torch transformers accelerate gguf numpy
  scripts/get-model.sh gemma3
  /tmp/fixvenv/bin/python scripts/make_gemma3_fixture.py
"""
from __future__ import annotations

import argparse
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_logits_fixture import (  # noqa: E402  (the SmolLM2 fixture's helpers)
    PROMPTS as SMOLLM_PROMPTS,
)
from make_logits_fixture import (
    compact_json,
    greedy,
    last_logits_full,
    last_logits_incremental,
    sha256_of,
    topk_info,
)

MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"
LIBRARY = (
    " Years later, the keeper's granddaughter found the notebooks in a wooden chest in the attic of "
    "her mother's house. There were dozens of them, bound in faded cloth, each page filled with the "
    "same careful handwriting. She read them slowly over a long winter, one evening at a time, and "
    "began to see the lighthouse as he had seen it: not as a lonely tower, but as a place where the "
    "small events of every day were worth writing down. He had noted the first swallows of spring, "
    "the year the harbour froze, the night a whale surfaced close enough to the rocks that he could "
    "hear it breathe. He had written about the supply boat that came every second Tuesday, about the "
    "books the captain lent him, and about the letters he wrote to his wife in the town across the "
    "water. Some entries were only a word or two: calm, rain, a fine sunset. Others ran for pages, "
    "describing storms that shook the glass of the lantern room and kept him awake until morning. "
    "She decided to copy the best of them into a single volume, so that the children of the village "
    "could read them in the school library. It took her most of a year. She checked every date "
    "against the harbour records, looked up the names of the ships, and asked the oldest fishermen "
    "what they remembered of the man who had kept the light. Many of them still spoke of him with "
    "respect. They said he never let the lamp go dark, not once in all his years on the cliff, and "
    "that on foggy nights the sound of his bell had guided more than one boat safely home. When the "
    "book was finally printed, the village held a small celebration in the hall by the harbour, and "
    "the granddaughter read aloud the entry about the fishing boat in the fog. Then she closed the "
    "book, looked out of the window at the tower on the cliff, and said that"
)
PROMPTS: list[tuple[str, str]] = [
    ("capital", "The capital of France is"),
    ("gemma_turn", "<start_of_turn>user\nWhat is gravity?<end_of_turn>\n<start_of_turn>model\n"),
    ("code", dict(SMOLLM_PROMPTS)["code"]),
    ("long", dict(SMOLLM_PROMPTS)["long_prose"] + LIBRARY),   # 600+ tokens: past the 512 window
]

PER_LAYER = {
    "attn_norm": "input_layernorm.weight", "post_attention_norm": "post_attention_layernorm.weight",
    "ffn_norm": "pre_feedforward_layernorm.weight", "post_ffw_norm": "post_feedforward_layernorm.weight",
    "attn_q_norm": "self_attn.q_norm.weight", "attn_k_norm": "self_attn.k_norm.weight",
    "attn_q": "self_attn.q_proj.weight", "attn_k": "self_attn.k_proj.weight", "attn_v": "self_attn.v_proj.weight",
    "attn_output": "self_attn.o_proj.weight", "ffn_gate": "mlp.gate_proj.weight", "ffn_up": "mlp.up_proj.weight",
    "ffn_down": "mlp.down_proj.weight",
}


def check_weights(model, gguf_path: Path) -> dict:
    """Every HF parameter against gguf-py's dequantization; HF's Gemma norms compute x * (1 + w), so
    their weight is the GGUF's minus one."""
    import gguf

    params = dict(model.named_parameters())
    worst, seen, types = 0.0, 0, {}
    for t in gguf.GGUFReader(str(gguf_path)).tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape([int(d) for d in reversed(t.shape)])
        if t.name == "token_embd.weight":
            hf = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            hf = "model.norm.weight"
        else:
            _, layer, kind, _ = t.name.split(".")
            hf = f"model.layers.{layer}.{PER_LAYER[kind]}"
        p = params[hf].detach().numpy()
        if "norm" in t.name:
            p = p + np.float32(1.0)
        if p.shape != w.shape:
            raise SystemExit(f"{t.name}: shape {w.shape} vs HF {hf} {p.shape}")
        worst = max(worst, float(np.max(np.abs(p - w))))
        seen += 1
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    if seen != len(params) or worst > 1e-6:
        raise SystemExit(f"weights differ from gguf-py dequant: compared {seen}/{len(params)}, max-abs {worst}")
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr() and \
            not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight):
        raise SystemExit("lm_head is not tied to embed_tokens")
    return {"tensors_compared": seen, "tensor_types": types, "max_abs_vs_gguf_py_dequant": worst}


@torch.no_grad()
def window_effect(model, ids: list[int]) -> float:
    """max |logits with the sliding window - logits with full attention everywhere| (last position)."""
    cfg = model.config
    saved = (list(cfg.layer_types), [layer.self_attn.sliding_window for layer in model.model.layers])
    try:
        cfg.layer_types = ["full_attention"] * cfg.num_hidden_layers
        for layer in model.model.layers:
            layer.self_attn.sliding_window = None
            layer.self_attn.is_sliding = False
            layer.attention_type = "full_attention"
        nowin = last_logits_full(model, ids)
    finally:
        cfg.layer_types = saved[0]
        for layer, sw in zip(model.model.layers, saved[1]):
            layer.self_attn.sliding_window = sw
            layer.self_attn.is_sliding = sw is not None
            layer.attention_type = "sliding_attention" if sw is not None else "full_attention"
    return float((nowin - last_logits_full(model, ids)).abs().max())


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

    gguf_path = Path(args.models_dir) / MODEL_NAME
    model = AutoModelForCausalLM.from_pretrained(args.models_dir, gguf_file=MODEL_NAME, dtype=torch.float32,
                                                 attn_implementation="eager").to("cpu").eval()
    tok = AutoTokenizer.from_pretrained(args.models_dir, gguf_file=MODEL_NAME)
    cfg = model.config
    print(f"loaded {type(model).__name__} in {time.time() - t0:.1f}s; layer_types {cfg.layer_types}; "
          f"window {cfg.sliding_window}; rope {getattr(cfg, 'rope_parameters', None)}", flush=True)
    assert cfg.model_type in ("gemma3", "gemma3_text") and cfg.vocab_size == 262144 and cfg.num_hidden_layers == 18
    assert cfg._attn_implementation == "eager" and cfg.sliding_window == 512
    weights = check_weights(model, gguf_path)
    print(f"weights: {weights}", flush=True)

    records, rows = [], []
    for key, text in PROMPTS:
        ids = tok(text, add_special_tokens=True)["input_ids"]
        if ids[0] != 2:
            ids = [2] + ids            # BOS, as llama.cpp adds it (tokenizer.ggml.add_bos_token)
        tp = time.time()
        full = last_logits_full(model, ids)
        inc = last_logits_incremental(model, ids)
        g = greedy(model, ids, tok)
        assert int(torch.argmax(full)) == g["greedy_ids"][0]
        rec = {"name": key, "text": text, "n_tokens": len(ids), "ids": ids, "last_top5": topk_info(full, tok),
               "incremental_vs_full_max_abs": float((inc - full).abs().max()), **g}
        if len(ids) > cfg.sliding_window:
            rec["window_effect_max_abs"] = window_effect(model, ids)
        rec["seconds"] = round(time.time() - tp, 2)
        records.append(rec)
        rows.append(full.numpy().astype(np.float32))
        print(f"[{key}] {len(ids)} tokens, inc-vs-full {rec['incremental_vs_full_max_abs']:.3g}, min margin "
              f"{rec['min_greedy_margin']:.4f}, window effect {rec.get('window_effect_max_abs')}, generate agrees "
              f"{rec['generate_agrees']}\n    -> {rec['greedy_text']!r}", flush=True)
    if not all(r["generate_agrees"] for r in records):
        raise SystemExit("hand-written greedy loop disagrees with model.generate")
    if max(r["n_tokens"] for r in records) <= cfg.sliding_window + 64:
        raise SystemExit("the long prompt is not past the sliding window")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    logits = np.stack(rows)
    assert np.isfinite(logits).all()
    np.save(out / "gemma3_ref_logits.npy", logits)
    meta = {
        "description": "Last-position float32 logits and greedy continuations of Gemma 3 270M, computed with HF "
                       "transformers + torch (CPU, float32, eager attention) loading the GGUF. Row i of "
                       "gemma3_ref_logits.npy belongs to prompts[i]. Made by scripts/make_gemma3_fixture.py.",
        "model_file": MODEL_NAME, "model_sha256": sha256_of(gguf_path), "logits_file": "gemma3_ref_logits.npy",
        "logits_shape": list(logits.shape), "add_bos": True, "n_greedy": len(records[0]["greedy_ids"]),
        "engine": {"attn_implementation": cfg._attn_implementation, "dtype": "float32", "device": "cpu",
                   "torch_threads": torch.get_num_threads(), "sliding_window": cfg.sliding_window,
                   "layer_types": cfg.layer_types, "rms_norm_eps": cfg.rms_norm_eps,
                   "rope": str(getattr(cfg, "rope_parameters", None))},
        "weights_check": weights,
        "versions": {n: version(n) for n in ("torch", "transformers", "gguf", "numpy", "tokenizers", "accelerate")},
        "prompts": records,
        "run_seconds": round(time.time() - t0, 1),
    }
    (out / "gemma3_ref.json").write_text(compact_json(meta) + "\n")
    print(f"wrote {out / 'gemma3_ref.json'} in {meta['run_seconds']}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
