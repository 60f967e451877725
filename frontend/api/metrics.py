"""GET /metrics through prometheus-client: one registry per server (tests run several in a process).

- the engine's counters and gauges under llama.cpp's `llamacpp:*` names and the node-recovery
  `llamarpc:*` ones, read from the engine at scrape time (a custom collector, so the names stay
  where llama.cpp's dashboards expect them);
- per node, labelled by its address (`node`): Computes and the node's compute seconds, bytes sent
  and received, weight-cache hits and misses, re-attaches (each backend's `BackendStats`, counted
  where the calls are made), and `llamarpc:node_up` with its state;
- histograms measured where a request's events arrive (`Submission`): time to first token,
  inter-token latency, queue wait; and one of each engine step's time by kind (the engine's
  `on_step`: decode-only, prompt-only, mixed, replay after a node loss);
- the process's RSS, CPU seconds, open files and start time (prometheus-client's ProcessCollector)."""
from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from ..engine import Engine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_GAP = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
_STEP = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STEP_KINDS = ("decode", "prompt", "mixed", "replay")
# (name, help, BackendStats field) of the per-node counters
_NODE_COUNTERS = (
    ("llamarpc:node_compute_calls_total", "Computes run on the node.", "compute_calls"),
    ("llamarpc:node_compute_seconds_total", "Seconds the node spent computing, as it reports them.",
     "compute_seconds"),
    ("llamarpc:node_sent_bytes_total", "Bytes sent to the node: tensor data and Compute requests.", "bytes_sent"),
    ("llamarpc:node_received_bytes_total", "Bytes received from the node: tensor data and Compute replies.",
     "bytes_received"),
    ("llamarpc:node_weight_cache_hits_total", "Weights the node had in its cache (not sent).", "cache_hits"),
    ("llamarpc:node_weight_cache_misses_total", "Weights the node did not have in its cache (sent).",
     "cache_misses"),
    ("llamarpc:node_reattaches_total", "New sessions opened after the node was lost.", "reattaches"),
)


def _rows(engine: Engine) -> list[tuple[str, str, str, float]]:
    m = engine.metrics
    kv_tokens = engine.kv.n_used
    st = engine.recovery.stats
    return [
        ("counter", "llamacpp:prompt_tokens_total", "Number of prompt tokens processed.", m.n_prompt_tokens_processed_total),
        ("counter", "llamacpp:prompt_seconds_total", "Prompt process time.", m.t_prompt_processing_total),
        ("counter", "llamacpp:tokens_predicted_total", "Number of generation tokens processed.",
         m.n_tokens_predicted_total),
        ("counter", "llamacpp:tokens_predicted_seconds_total", "Predict process time.", m.t_tokens_generation_total),
        ("counter", "llamacpp:tokens_drafted_total", "Number of speculative decoding tokens processed.",
         m.n_draft_total),
        ("counter", "llamacpp:tokens_drafted_accepted_total", "Number of speculative decoding tokens to be accepted.",
         m.n_draft_accepted_total),
        ("counter", "llamacpp:n_decode_total", "Total number of llama_decode() calls.", m.n_decode_total),
        # llama.cpp types it a counter; it is a maximum, and a counter's name must end in _total
        ("gauge", "llamacpp:n_tokens_max", "Largest observed n_tokens.", m.n_tokens_max),
        ("gauge", "llamacpp:prompt_tokens_seconds", "Average prompt throughput in tokens/s.",
         m.n_prompt_tokens_processed_total / m.t_prompt_processing_total if m.t_prompt_processing_total else 0.0),
        ("gauge", "llamacpp:predicted_tokens_seconds", "Average generation throughput in tokens/s.",
         m.n_tokens_predicted_total / m.t_tokens_generation_total if m.t_tokens_generation_total else 0.0),
        ("gauge", "llamacpp:n_busy_slots_per_decode", "Average number of busy slots per llama_decode() call.",
         m.n_busy_slots_total / m.n_decode_total if m.n_decode_total else 0.0),
        ("gauge", "llamacpp:kv_cache_usage_ratio", "KV-cache usage. 1 means 100 percent usage.", kv_tokens / engine.n_ctx),
        ("gauge", "llamacpp:kv_cache_tokens", "KV-cache tokens.", kv_tokens),
        ("gauge", "llamacpp:requests_processing", "Number of requests processing.", engine.n_processing),
        ("gauge", "llamacpp:requests_deferred", "Number of requests deferred.", engine.n_deferred),
        ("counter", "llamarpc:node_losses_total", "Node losses that paused the streams.", st.n_node_losses),
        ("counter", "llamarpc:node_reattached_total", "Lost nodes re-attached within the grace period.", st.n_reattached),
        ("counter", "llamarpc:layer_replacements_total", "Lost nodes whose layers were re-placed on other nodes.",
         st.n_replaced),
        ("counter", "llamarpc:replayed_tokens_total", "Tokens replayed to rebuild the KV cache after a loss.",
         st.n_replayed_tokens),
        ("counter", "llamarpc:streams_resumed_total", "Streams continued after a node loss.", st.n_streams_resumed),
        ("counter", "llamarpc:streams_failed_total", "Streams ended by a node loss (layers fit nowhere).",
         st.n_streams_failed),
    ]


class EngineCollector(Collector):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        for kind, name, help_, value in _rows(self.engine):
            # the family's name without _total: the text format adds it back on HELP/TYPE lines
            fam = Metric(name[:-6] if kind == "counter" else name, help_, kind)
            fam.add_sample(name, {}, float(value))
            yield fam
        up = Metric("llamarpc:node_up", "Whether a node is attached (1), lost (0) or removed (0).", "gauge")
        for n in self.engine.node_states():
            up.add_sample("llamarpc:node_up", {"node": str(n["name"]), "state": str(n["state"]),
                                               "layers": str(n["layers"])}, float(n["state"] == "attached"))
        yield up
        backends = self.engine.model.pipeline.backends()
        for name, help_, field in _NODE_COUNTERS:
            fam = Metric(name[:-6], help_, "counter")
            for b in backends:
                fam.add_sample(name, {"node": str(b.name)}, float(getattr(b.stats, field)))
            yield fam


class Observer:
    """A server's registry: the engine collector (once the engine exists), request histograms, the process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self.ttft = Histogram("llamarpc:time_to_first_token_seconds",
                              "From a request's submission to its first generated token.", buckets=_LATENCY,
                              registry=self.registry)
        self.itl = Histogram("llamarpc:inter_token_latency_seconds",
                             "Between two generated tokens of one request, as the HTTP layer receives them.",
                             buckets=_GAP, registry=self.registry)
        self.queue = Histogram("llamarpc:queue_wait_seconds",
                               "A request's time before its prompt was computed: wall time less the engine's "
                               "prompt and generation times.", buckets=_LATENCY, registry=self.registry)
        self.step = Histogram("llamarpc:step_seconds", "One engine step's compute, by kind: decode (every row a "
                              "generated token), prompt (prompt rows only), mixed, replay (after a node loss).",
                              ["kind"], buckets=_STEP, registry=self.registry)
        for kind in STEP_KINDS:
            self.step.labels(kind)
        self._engine: Engine | None = None

    def attach(self, engine: Engine) -> None:
        if self._engine is None:
            self._engine = engine
            self.registry.register(EngineCollector(engine))
            engine.on_step = lambda kind, seconds: self.step.labels(kind).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestClock:
    """One task's times, fed by `Submission.next()`."""

    def __init__(self, observer: Observer) -> None:
        self.obs = observer
        self.t0 = time.monotonic()
        self.last: float | None = None

    def token(self, n: int) -> None:
        now = time.monotonic()
        if self.last is None:
            self.obs.ttft.observe(now - self.t0)
        elif n:
            gap = (now - self.last) / n
            for _ in range(n):
                self.obs.itl.observe(gap)
        self.last = now

    def final(self, prompt_ms: float, predicted_ms: float) -> None:
        wall = time.monotonic() - self.t0
        self.obs.queue.observe(max(0.0, wall - (prompt_ms + predicted_ms) / 1e3))
