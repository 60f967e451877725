"""GET /metrics: Prometheus text with llama-box's llamacpp:* names (and llama.cpp's decode counters)."""
from __future__ import annotations

from ..engine import Engine


def render_metrics(engine: Engine) -> str:
    m = engine.metrics
    kv_tokens = engine.kv.n_used
    rows = [
        ("counter", "prompt_tokens_total", "Number of prompt tokens processed.", m.n_prompt_tokens_processed_total),
        ("counter", "prompt_seconds_total", "Prompt process time.", m.t_prompt_processing_total),
        ("counter", "tokens_predicted_total", "Number of generation tokens processed.", m.n_tokens_predicted_total),
        ("counter", "tokens_predicted_seconds_total", "Predict process time.", m.t_tokens_generation_total),
        ("counter", "tokens_drafted_total", "Number of speculative decoding tokens processed.", 0),
        ("counter", "tokens_drafted_accepted_total", "Number of speculative decoding tokens to be accepted.", 0),
        ("counter", "n_decode_total", "Total number of llama_decode() calls.", m.n_decode_total),
        ("counter", "n_tokens_max", "Largest observed n_tokens.", m.n_tokens_max),
        ("gauge", "prompt_tokens_seconds", "Average prompt throughput in tokens/s.",
         m.n_prompt_tokens_processed_total / m.t_prompt_processing_total if m.t_prompt_processing_total else 0.0),
        ("gauge", "predicted_tokens_seconds", "Average generation throughput in tokens/s.",
         m.n_tokens_predicted_total / m.t_tokens_generation_total if m.t_tokens_generation_total else 0.0),
        ("gauge", "n_busy_slots_per_decode", "Average number of busy slots per llama_decode() call.",
         m.n_busy_slots_total / m.n_decode_total if m.n_decode_total else 0.0),
        ("gauge", "kv_cache_usage_ratio", "KV-cache usage. 1 means 100 percent usage.", kv_tokens / engine.n_ctx),
        ("gauge", "kv_cache_tokens", "KV-cache tokens.", kv_tokens),
        ("gauge", "requests_processing", "Number of requests processing.", engine.n_processing),
        ("gauge", "requests_deferred", "Number of requests deferred.", engine.n_deferred),
    ]
    out = []
    for kind, name, help_, value in rows:
        out.append(f"# HELP llamacpp:{name} {help_}\n# TYPE llamacpp:{name} {kind}\nllamacpp:{name} {value}\n")
    return "".join(out)
