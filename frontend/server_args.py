"""The server's command-line flags, named as llama-server / llama-box name them, each also read from
its LLAMA_ARG_* environment variable (a flag given on the command line wins)."""
from __future__ import annotations

import argparse
import os


def _env(name: str, default: object = None) -> object:
    return os.environ.get(f"LLAMA_ARG_{name}", default)


def _env_bool(name: str, default: bool) -> bool:
    v = os.environ.get(f"LLAMA_ARG_{name}")
    if v is None:
        return default
    return v.strip().lower() in ("1", "true", "on", "enabled", "yes")


def add_server_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server (without -p / --chat)")
    g.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="address to listen on (LLAMA_ARG_HOST)")
    g.add_argument("--port", type=int, default=int(_env("PORT", 8080)), help="port to listen on (LLAMA_ARG_PORT)")
    g.add_argument("-np", "--parallel", type=int, default=int(_env("N_PARALLEL", 1)),
                   help="slots; each gets ctx-size / parallel of the context (LLAMA_ARG_N_PARALLEL)")
    g.add_argument("-ub", "--ubatch-size", type=int, default=int(_env("UBATCH", 512)),
                   help="physical maximum batch size: tokens per forward (LLAMA_ARG_UBATCH)")
    g.add_argument("-pc", "--prefill-chunk", type=int, default=int(_env("PREFILL_CHUNK", 0)),
                   help="prompt tokens per step while other slots decode; 0 = sized from measured step times so "
                        "a step takes about 1.4 decode-only steps (LLAMA_ARG_PREFILL_CHUNK)")
    g.add_argument("-to", "--timeout", type=float, default=float(_env("TIMEOUT", 600)),
                   help="seconds a request may wait for its next result (LLAMA_ARG_TIMEOUT)")
    g.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="API key (repeatable, or comma-separated); Bearer auth on all but /health (LLAMA_API_KEY)")
    g.add_argument("--api-key-file", default=_env("API_KEY_FILE"),
                   help="file with API keys, one per line, '#' comments (LLAMA_ARG_API_KEY_FILE)")
    g.add_argument("--ssl-key-file", default=_env("SSL_KEY_FILE"), help="PEM private key for HTTPS")
    g.add_argument("--ssl-cert-file", default=_env("SSL_CERT_FILE"), help="PEM certificate for HTTPS")
    g.add_argument("--metrics", action="store_true", default=_env_bool("ENDPOINT_METRICS", False),
                   help="enable GET /metrics (LLAMA_ARG_ENDPOINT_METRICS)")
    g.add_argument("--slots", dest="slots", action="store_true", default=_env_bool("ENDPOINT_SLOTS", False),
                   help="enable GET /slots (LLAMA_ARG_ENDPOINT_SLOTS)")
    g.add_argument("--no-slots", dest="slots", action="store_false")
    g.add_argument("--chat-template-file", default=_env("CHAT_TEMPLATE_FILE"),
                   help="file with a jinja chat template (LLAMA_ARG_CHAT_TEMPLATE_FILE)")
    g.add_argument("-a", "--alias", default=_env("ALIAS", _env("MODEL_ALIAS", "")),
                   help="model name the API reports (LLAMA_ARG_ALIAS or llama-box's LLAMA_ARG_MODEL_ALIAS)")
    g.add_argument("--cache-prompt", dest="cache_prompt", action="store_true",
                   default=_env_bool("CACHE_PROMPT", True), help="reuse a slot's cached prompt prefix (default)")
    g.add_argument("--no-cache-prompt", dest="cache_prompt", action="store_false")
    s = p.add_argument_group("server sampling defaults (a request may override each)")
    s.add_argument("--repeat-last-n", type=int, default=64)
    s.add_argument("--repeat-penalty", type=float, default=float(_env("REPEAT_PENALTY", 1.0)))
    s.add_argument("--presence-penalty", type=float, default=float(_env("PRESENCE_PENALTY", 0.0)))
    s.add_argument("--frequency-penalty", type=float, default=float(_env("FREQUENCY_PENALTY", 0.0)))
    s.add_argument("--typical", type=float, default=1.0)
    s.add_argument("--top-nsigma", type=float, default=-1.0)
    s.add_argument("--xtc-probability", type=float, default=0.0)
    s.add_argument("--xtc-threshold", type=float, default=0.1)
    s.add_argument("--dynatemp-range", type=float, default=0.0)
    s.add_argument("--dynatemp-exp", type=float, default=1.0)
    s.add_argument("--mirostat", type=int, default=0)
    s.add_argument("--mirostat-lr", type=float, default=0.1)
    s.add_argument("--mirostat-ent", type=float, default=5.0)
    s.add_argument("--dry-multiplier", type=float, default=0.0)
    s.add_argument("--dry-base", type=float, default=1.75)
    s.add_argument("--dry-allowed-length", type=int, default=2)
    s.add_argument("--dry-penalty-last-n", type=int, default=-1)
    s.add_argument("--dry-sequence-breaker", action="append", default=None)
    s.add_argument("--samplers", default=None, help="sampler order, ';'-separated names")
    s.add_argument("--sampling-seq", default=None, help="sampler order as characters, e.g. edskypmxt")
    s.add_argument("-l", "--logit-bias", action="append", default=None, metavar="TOKEN_ID(+/-)BIAS")
