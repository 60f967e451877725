"""The ``llamarpc`` command line: one parser for the one-shot mode (``-p`` / ``--chat``) and the
server, flags named as llama.cpp / llama-server / llama-box name them, each also read from its
LLAMA_ARG_* environment variable (a flag given on the command line wins). Nothing heavy is
imported here: numpy comes only after the BLAS thread limit is set."""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..sampling import SamplingParams

DESCRIPTION = """``llamarpc``: one-shot generation (``-p`` / ``--chat``), like llama-cli.

Flags follow llama.cpp's names; each also reads its LLAMA_ARG_* environment variable.
"""


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
    s = p.add_argument_group("sampling (the one-shot run's, and the server's defaults: a request may override each)")
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llamarpc", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=_env("MODEL"), help="GGUF model file (LLAMA_ARG_MODEL)")
    p.add_argument("-p", "--prompt", default=None, help="prompt to continue (one-shot mode)")
    p.add_argument("--chat", default=None, metavar="QUESTION",
                   help="one-shot chat: render QUESTION with the model's chat template, print the answer")
    p.add_argument("-sys", "--system-prompt", default=None, help="system message for --chat")
    p.add_argument("--chat-template", default=_env("CHAT_TEMPLATE"), help="jinja chat template to use instead of the model's")
    p.add_argument("-n", "--n-predict", type=int, default=int(_env("N_PREDICT", -1)),
                   help="tokens to generate, -1 = until end of generation (LLAMA_ARG_N_PREDICT)")
    p.add_argument("-c", "--ctx-size", type=int, default=int(_env("CTX_SIZE", 0)),
                   help="context size, 0 = min(training context, 4096) (LLAMA_ARG_CTX_SIZE)")
    p.add_argument("-ctk", "--cache-type-k", choices=["f32", "f16"], default=_env("CACHE_TYPE_K", "f32"),
                   help="KV cache type for K (LLAMA_ARG_CACHE_TYPE_K; K and V share one type here)")
    p.add_argument("-ctv", "--cache-type-v", choices=["f32", "f16"], default=_env("CACHE_TYPE_V", None),
                   help="KV cache type for V (default: the K type; must equal it)")
    p.add_argument("-b", "--batch-size", type=int, default=int(_env("BATCH", 512)), help="prompt tokens per step")
    p.add_argument("-t", "--threads", type=int, default=int(_env("THREADS", 0)),
                   help="BLAS threads, 0 = all cores (LLAMA_ARG_THREADS)")
    p.add_argument("--temp", type=float, default=0.8, help="temperature, 0 = greedy")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("-s", "--seed", type=int, default=-1, help="RNG seed, -1 = random")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-generation tokens")
    p.add_argument("--no-display-prompt", action="store_true", help="print only the generated text")
    p.add_argument("--rpc", default=_env("RPC"), metavar="HOST:PORT,...",
                   help="compute nodes (llamarpc-server) to place the layers on (LLAMA_ARG_RPC)")
    p.add_argument("-ts", "--tensor-split", default=_env("TENSOR_SPLIT"), metavar="N0,N1,...",
                   help="share of layers per node, e.g. 3,1 (default: by free memory)")
    p.add_argument("--rpc-token-file", default=os.environ.get("LLAMARPC_AUTH_TOKEN_FILE"),
                   help="file with the nodes' shared secret")
    p.add_argument("--rpc-tls-ca", default=os.environ.get("LLAMARPC_TLS_CA"),
                   help="PEM CA/certificate to verify TLS nodes (enables TLS)")
    p.add_argument("--device", default=os.environ.get("LLAMARPC_DEVICE", "cpu"),
                   help="device of the in-process node: cpu or cuda:N (cupy; not yet verified on hardware)")
    p.add_argument("--matmul", choices=("exact", "fast", "reference"), default=os.environ.get("LLAMARPC_MATMUL", "exact"),
                   help="in-process node: multiply by quantized weights with float32 activations (exact, the default), "
                        "8-bit activations (fast, as llama.cpp) or numpy (reference)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_server_args(p)
    return p


def _logit_bias(specs: list[str] | None) -> tuple[tuple[int, float], ...]:
    out = []
    for spec in specs or []:
        m = re.fullmatch(r"\s*(\d+)\s*([+-])\s*(inf|[0-9.eE+-]+)\s*", spec)
        if not m:
            raise ValueError(f"--logit-bias {spec!r}: expected TOKEN_ID+BIAS or TOKEN_ID-BIAS")
        bias = float(m.group(3))
        out.append((int(m.group(1)), -bias if m.group(2) == "-" else bias))
    return tuple(out)


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    """The sampling flags as SamplingParams, checked (a bad value is a ValueError): the server's
    defaults, and what the one-shot mode samples with."""
    from ..sampling import SamplingParams, samplers_from_chars, samplers_from_names

    samplers = SamplingParams().samplers
    if args.samplers:
        samplers = samplers_from_names([s for s in re.split(r"[;,]", args.samplers) if s])
    elif args.sampling_seq:
        samplers = samplers_from_chars(args.sampling_seq)
    sampling = SamplingParams(
        temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed,
        dynatemp_range=args.dynatemp_range, dynatemp_exponent=args.dynatemp_exp, typical_p=args.typical,
        top_n_sigma=args.top_nsigma, xtc_probability=args.xtc_probability, xtc_threshold=args.xtc_threshold,
        repeat_last_n=args.repeat_last_n, repeat_penalty=args.repeat_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        dry_multiplier=args.dry_multiplier, dry_base=args.dry_base, dry_allowed_length=args.dry_allowed_length,
        dry_penalty_last_n=args.dry_penalty_last_n,
        dry_sequence_breakers=tuple(args.dry_sequence_breaker) if args.dry_sequence_breaker
        else SamplingParams().dry_sequence_breakers,
        mirostat=args.mirostat, mirostat_tau=args.mirostat_ent, mirostat_eta=args.mirostat_lr,
        samplers=samplers, logit_bias=_logit_bias(args.logit_bias))
    sampling.validate()
    return sampling


def chat_template_from_args(args: argparse.Namespace) -> str | None:
    """--chat-template-file's text, else --chat-template, else None (the model's own)."""
    if args.chat_template_file:
        return Path(args.chat_template_file).read_text()
    return args.chat_template
