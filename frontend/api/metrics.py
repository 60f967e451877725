"""GET /metrics: Prometheus text with llama-box's llamacpp:* names (and llama.cpp's decode counters),
then llamarpc:* for the nodes: each node's state, losses, re-attaches, re-placements, replayed tokens."""
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
    st = engine.recovery.stats
    for kind, name, help_, value in (
            ("counter", "node_losses_total", "Node losses that paused the streams.", st.n_node_losses),
            ("counter", "node_reattached_total", "Lost nodes re-attached within the grace period.", st.n_reattached),
            ("counter", "layer_replacements_total", "Lost nodes whose layers were re-placed on other nodes.",
             st.n_replaced),
            ("counter", "replayed_tokens_total", "Tokens replayed to rebuild the KV cache after a loss.",
             st.n_replayed_tokens),
            ("counter", "streams_resumed_total", "Streams continued after a node loss.", st.n_streams_resumed),
            ("counter", "streams_failed_total", "Streams ended by a node loss (layers fit nowhere).",
             st.n_streams_failed)):
        out.append(f"# HELP llamarpc:{name} {help_}\n# TYPE llamarpc:{name} {kind}\nllamarpc:{name} {value}\n")
    out.append("# HELP llamarpc:node_up Whether a node is attached (1), lost (0) or removed (0).\n"
               "# TYPE llamarpc:node_up gauge\n")
    for n in engine.node_states():
        name = str(n["name"]).replace("\\", "\\\\").replace('"', '\\"')
        out.append(f'llamarpc:node_up{{node="{name}",state="{n["state"]}",layers="{n["layers"]}"}} '
                   f'{int(n["state"] == "attached")}\n')
    return "".join(out)
