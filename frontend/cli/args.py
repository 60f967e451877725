"""The ``llamarpc`` command line as one table of flags (`FLAGS`), for both modes: one-shot
generation (``-p`` / ``--chat``) and the HTTP server (neither). Flags are named as llama.cpp /
llama-server / llama-box name them and read the same LLAMA_ARG_* variables; llamarpc's own flags
read LLAMARPC_* ones. The table goes through the shared argument layer (`proto.cliargs`): ranges
checked at parse time, no abbreviations, llama-server flags without an effect here accepted with a
note, the help text generated from the table. Nothing heavy is imported here: numpy comes only
after the BLAS thread limit is set."""
from __future__ import annotations

import argparse
import json
import re
from typing import TYPE_CHECKING

from llamarpc.proto.cliargs import CLIError, Flag, FlagParser, existing_file, number_list, ranged, read_file

if TYPE_CHECKING:
    from ..sampling import SamplingParams

DESCRIPTION = """llamarpc: run a GGUF model, in process or with its layers on llamarpc-server nodes (--rpc).

modes:
  one-shot   llamarpc -m MODEL.gguf -p "PROMPT" [-n 64]     continue PROMPT and print it (like llama-cli)
             llamarpc -m MODEL.gguf --chat "QUESTION"       answer through the model's chat template
  server     llamarpc -m MODEL.gguf [--port 8080] [-np 4]   (no -p / --chat) the HTTP server: llama.cpp's
             server API, OpenAI's and llm-api's (like llama-server)

Here -p is the prompt, -m the model and -c the context size, as in llama.cpp; on llamarpc-server
(the compute node) -p is the port, -m --reserve-memory and -c --cache-dir, as in llama.cpp's rpc-server.
"""

SERVER = "server (without -p / --chat)"
SAMPLING = "sampling (the one-shot run's, and the server's defaults: a request may override each)"
SPECULATIVE = "speculative decoding (a draft model, or n-gram lookup in the context)"
SPEC_TYPES = ("none", "ngram-simple")
NO_EFFECT = "llama-server flags with no effect here (accepted, with a note)"
_INT = ranged(int)
_POS = ranged(int, 1)
_NONNEG = ranged(int, 0)
_FLOAT = ranged(float)
_NONNEG_F = ranged(float, 0.0)


def _a(name: str) -> str:
    return f"LLAMA_ARG_{name}"


def _r(name: str) -> str:
    return f"LLAMARPC_{name}"


def _gpu(*names: str, env: str, why: str = "layers run where --rpc / --device place them", value: bool = True,
         metavar: str = "N", nargs: str | None = None) -> Flag:
    return Flag(names, type=str if value else None, env=env, group=NO_EFFECT, ignored=why, metavar=metavar,
                nargs=nargs)


FLAGS: list[Flag] = [
    Flag(("-m", "--model"), "GGUF model file (required)", existing_file, env=_a("MODEL"), metavar="FNAME"),
    Flag(("-p", "--prompt"), "prompt to continue (one-shot mode)"),
    Flag(("--chat",), "one-shot chat: render QUESTION with the model's chat template, print the answer",
         metavar="QUESTION"),
    Flag(("-sys", "--system-prompt"), "system message for --chat (and llm-api's /chat)"),
    Flag(("--chat-template",), "chat template to use instead of the model's: a built-in name (chatml, llama3, "
         "gemma, mistral-v7, phi3, zephyr, ...; an unknown name is an error listing them) or a jinja template",
         env=_a("CHAT_TEMPLATE"), metavar="JINJA_TEMPLATE"),
    Flag(("--chat-template-file",), "file with a jinja chat template", env=_a("CHAT_TEMPLATE_FILE"),
         metavar="FNAME"),
    Flag(("--chat-template-kwargs",), "JSON object of extra chat template variables, e.g. "
         "'{\"enable_thinking\": false}'; a request's chat_template_kwargs override them", env=_a("CHAT_TEMPLATE_KWARGS"),
         metavar="STRING"),
    Flag(("--reasoning-format",), "thinking in chat replies: none = left inline in content; deepseek / auto = "
         "<think>...</think> moved to message.reasoning_content (delta.reasoning_content when streamed)", str, "auto",
         env=_a("THINK"), choices=("none", "deepseek", "auto"), metavar="FORMAT"),
    Flag(("--reasoning-budget",), "thinking budget: -1 = unrestricted, 0 = no thinking (the template is rendered "
         "with enable_thinking=false); N > 0 is not enforced here (unrestricted, with a warning)", ranged(int, -1), -1,
         env=_a("THINK_BUDGET"), metavar="N"),
    Flag(("-n", "--n-predict"), "tokens to generate: -1 = until end of generation, -2 = until the context is full "
         "(the same without --context-shift)", ranged(int, -2), -1, env=_a("N_PREDICT"), metavar="N"),
    Flag(("-c", "--ctx-size"), "context size, 0 = min(training context, 4096)", _NONNEG, 0, env=_a("CTX_SIZE"),
         metavar="N"),
    Flag(("-ctk", "--cache-type-k"), "KV cache type for K (K and V share one type here)", str, "f32",
         env=_a("CACHE_TYPE_K"), choices=("f32", "f16"), metavar="TYPE"),
    Flag(("-ctv", "--cache-type-v"), "KV cache type for V (default: the K type; must equal it)", str, None,
         env=_a("CACHE_TYPE_V"), choices=("f32", "f16"), metavar="TYPE"),
    Flag(("--lora",), "LoRA adapter GGUF, scale 1 (repeatable, or comma-separated); ids in command-line order",
         str, None, dest="lora", append=True, metavar="FNAME"),
    Flag(("--lora-scaled",), "LoRA adapter with a scale: FNAME SCALE, or FNAME:SCALE[,...] (repeatable)",
         str, None, dest="lora", append=True, nargs="+", metavar="FNAME SCALE"),
    Flag(("--lora-init-without-apply",), "load the LoRA adapters with scale 0 (set them with POST "
         "/lora-adapters or a request's 'lora')", None, False),
    Flag(("-b", "--batch-size"), "logical batch: prompt tokens per step", _POS, 512, env=_a("BATCH"), metavar="N"),
    Flag(("-ub", "--ubatch-size"), "physical batch: tokens per forward", _POS, 512, env=_a("UBATCH"), metavar="N"),
    Flag(("-t", "--threads"), "threads of BLAS and the in-process node, 0 = all cores", _NONNEG, 0,
         env=_a("THREADS"), metavar="N"),
    Flag(("-s", "--seed"), "RNG seed, -1 = random", ranged(int, -1, 2**32 - 1), -1, env=_a("SEED"), metavar="N"),
    Flag(("--ignore-eos",), "keep generating past end-of-generation tokens (bans them)", None, False,
         env=_a("IGNORE_EOS")),
    Flag(("--no-display-prompt",), "one-shot: print only the generated text", None, False),
    Flag(("--rpc",), "compute nodes (llamarpc-server) to place the layers on", env=_a("RPC"),
         metavar="HOST:PORT,..."),
    Flag(("-ts", "--tensor-split"), "share of layers per node, e.g. 3,1 (default: by free memory)", number_list,
         env=_a("TENSOR_SPLIT"), metavar="N0,N1,..."),
    Flag(("--rpc-token-file",), "file with the nodes' shared secret", env=_r("AUTH_TOKEN_FILE"), metavar="FNAME"),
    Flag(("--rpc-tls-ca",), "PEM CA/certificate to verify TLS nodes (enables TLS)", env=_r("TLS_CA"),
         metavar="FNAME"),
    Flag(("--node-grace",), "seconds a lost node has to come back before its layers are re-placed on the other "
         "nodes; streams pause meanwhile and continue where they stopped", ranged(float, 0.0, 3600.0), 5.0,
         env=_r("NODE_GRACE"), metavar="S"),
    Flag(("--device",), "device of the in-process node: cpu or cuda:N (cupy)", str, "cpu", env=_r("DEVICE")),
    Flag(("--matmul",), "in-process node: multiply by quantized weights with float32 activations (exact), "
         "8-bit activations (fast, as llama.cpp) or numpy (reference)", str, "exact", env=_r("MATMUL"),
         choices=("exact", "fast", "reference")),
    Flag(("-v", "--verbose"), "debug logging", None, False, env=_a("VERBOSE")),
    # the server
    Flag(("--host",), "address(es) to listen on, comma-separated", str, "127.0.0.1", env=_a("HOST"),
         group=SERVER),
    Flag(("--port",), "port to listen on", ranged(int, 0, 65535), 8080, env=_a("PORT"), group=SERVER),
    Flag(("-np", "--parallel"), "slots; each gets ctx-size / parallel of the context", _POS, 1,
         env=_a("N_PARALLEL"), group=SERVER, metavar="N"),
    Flag(("-pc", "--prefill-chunk"), "prompt tokens per step while other slots decode; 0 = sized from measured "
         "step times so a step takes about 1.4 decode-only steps", _NONNEG, 0, env=_r("PREFILL_CHUNK"),
         group=SERVER, metavar="N"),
    Flag(("-to", "--timeout"), "seconds a request may wait for its next result", ranged(float, 0.001), 600.0,
         env=_a("TIMEOUT"), group=SERVER, metavar="S"),
    Flag(("--api-key",), "API key (repeatable, or comma-separated); Bearer auth on all but /health",
         str, None, env="LLAMA_API_KEY", append=True, group=SERVER, metavar="KEY"),
    Flag(("--api-key-file",), "file with API keys, one per line, '#' comments", env=_a("API_KEY_FILE"),
         group=SERVER, metavar="FNAME"),
    Flag(("--ssl-key-file",), "PEM private key for HTTPS", env=_a("SSL_KEY_FILE"), group=SERVER, metavar="FNAME"),
    Flag(("--ssl-cert-file",), "PEM certificate for HTTPS", env=_a("SSL_CERT_FILE"), group=SERVER,
         metavar="FNAME"),
    Flag(("--metrics",), "enable GET /metrics", None, False, env=_a("ENDPOINT_METRICS"), group=SERVER),
    Flag(("--slots",), "enable GET /slots", None, False, env=_a("ENDPOINT_SLOTS"), group=SERVER),
    Flag(("--no-slots",), "disable GET /slots (the default)", None, env=_a("NO_ENDPOINT_SLOTS"), dest="slots",
         store=False, group=SERVER),
    Flag(("--slot-save-path",), "directory of POST /slots/{id}?action=save|restore files (off when not given)",
         str, "", env=_a("SLOT_SAVE_PATH"), group=SERVER, metavar="PATH"),
    Flag(("--context-shift",), "when a slot's context fills during generation, drop the oldest tokens after "
         "n_keep and go on", None, False, env=_a("CONTEXT_SHIFT")),
    Flag(("--no-context-shift",), "stop a generation when the slot's context is full (the default)", None,
         env=_a("NO_CONTEXT_SHIFT"), dest="context_shift", store=False),
    Flag(("--embedding", "--embeddings"), "serve embeddings (/v1/embeddings, /embedding)", None, False,
         env=_a("EMBEDDINGS"), group=SERVER),
    Flag(("--pooling",), "embeddings' pooling (default: the model's, else none)", str, None, env=_a("POOLING"),
         choices=("none", "mean", "cls", "last", "rank"), group=SERVER, metavar="{none,mean,cls,last,rank}"),
    Flag(("--reranking", "--rerank"), "serve /v1/rerank (sets --embeddings and --pooling rank)", None, False,
         env=_a("RERANKING"), group=SERVER),
    Flag(("-a", "--alias"), "model name(s) the API reports, comma-separated (llama-box: LLAMA_ARG_MODEL_ALIAS)",
         str, "", env=_a("ALIAS"), group=SERVER, metavar="NAME,..."),
    Flag(("--cache-prompt",), "reuse a slot's cached prompt prefix (the default)", None, True,
         env=_a("CACHE_PROMPT"), group=SERVER),
    Flag(("--no-cache-prompt",), "do not reuse cached prompt prefixes", None, dest="cache_prompt", store=False,
         group=SERVER),
    Flag(("--cors-origins",), "origins a browser may call from, comma-separated; '*' reflects any origin with "
         "credentials, as llama-server does", str, "*", env=_a("CORS_ORIGINS"), group=SERVER, metavar="ORIGIN,..."),
    Flag(("--webui",), "serve the web chat page at / (the default)", None, True, env=_a("WEBUI"), group=SERVER),
    Flag(("--no-webui",), "do not serve the web chat page", None, env=_a("NO_WEBUI"), dest="webui", store=False,
         group=SERVER),
    Flag(("--max-body",), "largest request body in bytes (a larger one is a 413)", ranged(int, 1024), 4 << 20,
         env=_r("MAX_BODY"), group=SERVER, metavar="BYTES"),
    Flag(("--max-json-depth",), "deepest nesting of a request's JSON (deeper is a 400)", ranged(int, 2, 1000), 64,
         env=_r("MAX_JSON_DEPTH"), group=SERVER, metavar="N"),
    # sampling
    Flag(("--temp",), "temperature, 0 = greedy", _NONNEG_F, 0.8, env=_a("TEMP"), group=SAMPLING, metavar="T"),
    Flag(("--top-k",), "", _NONNEG, 40, env=_a("TOP_K"), group=SAMPLING, metavar="N"),
    Flag(("--top-p",), "", ranged(float, 0.0, 1.0), 0.95, env=_a("TOP_P"), group=SAMPLING, metavar="P"),
    Flag(("--min-p",), "", ranged(float, 0.0, 1.0), 0.05, env=_a("MIN_P"), group=SAMPLING, metavar="P"),
    Flag(("--repeat-last-n",), "", ranged(int, -1), 64, env=_a("REPEAT_LAST_N"), group=SAMPLING, metavar="N"),
    Flag(("--repeat-penalty",), "", _NONNEG_F, 1.0, env=_a("REPEAT_PENALTY"), group=SAMPLING, metavar="X"),
    Flag(("--presence-penalty",), "", _FLOAT, 0.0, env=_a("PRESENCE_PENALTY"), group=SAMPLING, metavar="X"),
    Flag(("--frequency-penalty",), "", _FLOAT, 0.0, env=_a("FREQUENCY_PENALTY"), group=SAMPLING, metavar="X"),
    Flag(("--typical",), "", ranged(float, 0.0, 1.0), 1.0, env=_a("TYPICAL"), group=SAMPLING, metavar="P"),
    Flag(("--top-nsigma",), "", _FLOAT, -1.0, env=_a("TOP_NSIGMA"), group=SAMPLING, metavar="N"),
    Flag(("--xtc-probability",), "", ranged(float, 0.0, 1.0), 0.0, env=_a("XTC_PROBABILITY"), group=SAMPLING,
         metavar="P"),
    Flag(("--xtc-threshold",), "", ranged(float, 0.0, 1.0), 0.1, env=_a("XTC_THRESHOLD"), group=SAMPLING,
         metavar="P"),
    Flag(("--dynatemp-range",), "", _NONNEG_F, 0.0, env=_a("DYNATEMP_RANGE"), group=SAMPLING, metavar="X"),
    Flag(("--dynatemp-exp",), "", _NONNEG_F, 1.0, env=_a("DYNATEMP_EXP"), group=SAMPLING, metavar="X"),
    Flag(("--mirostat",), "0 off, 1 or 2", ranged(int, 0, 2), 0, env=_a("MIROSTAT"), group=SAMPLING, metavar="N"),
    Flag(("--mirostat-lr",), "", _NONNEG_F, 0.1, env=_a("MIROSTAT_LR"), group=SAMPLING, metavar="ETA"),
    Flag(("--mirostat-ent",), "", _NONNEG_F, 5.0, env=_a("MIROSTAT_ENT"), group=SAMPLING, metavar="TAU"),
    Flag(("--dry-multiplier",), "", _NONNEG_F, 0.0, env=_a("DRY_MULTIPLIER"), group=SAMPLING, metavar="X"),
    Flag(("--dry-base",), "", ranged(float, 1.0), 1.75, env=_a("DRY_BASE"), group=SAMPLING, metavar="X"),
    Flag(("--dry-allowed-length",), "", _NONNEG, 2, env=_a("DRY_ALLOWED_LENGTH"), group=SAMPLING, metavar="N"),
    Flag(("--dry-penalty-last-n",), "", ranged(int, -1), -1, env=_a("DRY_PENALTY_LAST_N"), group=SAMPLING,
         metavar="N"),
    Flag(("--dry-sequence-breaker",), "repeatable", str, None, env=_a("DRY_SEQUENCE_BREAKER"), append=True,
         group=SAMPLING, metavar="STR"),
    Flag(("--samplers",), "sampler order, ';'-separated names", env=_a("SAMPLERS"), group=SAMPLING,
         metavar="NAMES"),
    Flag(("--sampling-seq",), "sampler order as characters, e.g. edskypmxt", env=_a("SAMPLING_SEQ"),
         group=SAMPLING, metavar="CHARS"),
    Flag(("-l", "--logit-bias"), "repeatable", str, None, env=_a("LOGIT_BIAS"), append=True, group=SAMPLING,
         metavar="TOKEN_ID(+/-)BIAS"),
    # llama-server's flags that have no effect here
    _gpu("-ngl", "--gpu-layers", "--n-gpu-layers", env=_a("N_GPU_LAYERS")),
    _gpu("-sm", "--split-mode", env=_a("SPLIT_MODE"), why="layers are split by -ts over --rpc nodes",
         metavar="MODE"),
    _gpu("-mg", "--main-gpu", env=_a("MAIN_GPU")),
    _gpu("-dev", env=_a("DEVICE"), why="the nodes' devices are theirs; --device picks the in-process node's",
         metavar="DEVS"),
    _gpu("-fa", "--flash-attn", env=_a("FLASH_ATTN"), why="the nodes' attention kernel is fixed", metavar="on|off|auto",
         nargs="?"),
    _gpu("--mlock", env=_a("MLOCK"), why="weights live on the nodes", value=False),
    _gpu("--no-mmap", env=_a("NO_MMAP"), why="the model file is read once, as it is sent", value=False),
    _gpu("-nkvo", "--no-kv-offload", env=_a("NO_KV_OFFLOAD"), why="the KV cache lives on the nodes", value=False),
    _gpu("--numa", env=_a("NUMA"), why="threads are the nodes' (--threads)", metavar="TYPE"),
    _gpu("-tb", "--threads-batch", env=_a("THREADS_BATCH"), why="-t sets every thread pool"),
    _gpu("-cb", "--cont-batching", env=_a("CONT_BATCHING"), why="batching is always continuous", value=False),
    _gpu("--jinja", env=_a("JINJA"), why="chat templates are always jinja", value=False),
    _gpu("--threads-http", env=_a("THREADS_HTTP"), why="the HTTP server is asynchronous"),
    _gpu("-ngld", "--gpu-layers-draft", "--n-gpu-layers-draft", "--spec-draft-ngl", env=_a("N_GPU_LAYERS_DRAFT"),
         why="the draft's layers run in process or on the --rpc-draft nodes"),
    # speculative decoding
    Flag(("-md", "--model-draft"), "draft model for speculative decoding (its vocabulary must match the model's)",
         existing_file, env=_a("MODEL_DRAFT"), group=SPECULATIVE, metavar="FNAME"),
    Flag(("--rpc-draft",), "nodes (llamarpc-server) for the draft model's layers (default: in process)",
         env=_r("RPC_DRAFT"), group=SPECULATIVE, metavar="HOST:PORT,..."),
    Flag(("--spec-type",), "speculative decoding without a draft model: ngram-simple looks the last "
         "--spec-ngram-size-n tokens up in the context and drafts what followed them", str, "none",
         env=_a("SPEC_TYPE"), choices=SPEC_TYPES, group=SPECULATIVE, metavar="{" + ",".join(SPEC_TYPES) + "}"),
    Flag(("--draft-max", "--draft", "--draft-n", "--spec-draft-n-max"), "most tokens drafted per step", _NONNEG,
         16, env=_a("DRAFT_MAX"), dest="draft_max", group=SPECULATIVE, metavar="N"),
    Flag(("--draft-min", "--draft-n-min", "--spec-draft-n-min"), "fewest draft tokens worth verifying", _NONNEG,
         0, env=_a("DRAFT_MIN"), dest="draft_min", group=SPECULATIVE, metavar="N"),
    Flag(("--draft-p-min", "--spec-draft-p-min"), "the draft model drafts while its top token's probability "
         "is at least P", ranged(float, 0.0, 1.0), 0.8, env=_a("DRAFT_P_MIN"), dest="draft_p_min",
         group=SPECULATIVE, metavar="P"),
    Flag(("-cd", "--ctx-size-draft"), "the draft model's context, 0 = the model's", _NONNEG, 0,
         env=_a("CTX_SIZE_DRAFT"), group=SPECULATIVE, metavar="N"),
    Flag(("--spec-ngram-size-n",), "ngram-simple: tokens looked up", _POS, 12, env=_a("SPEC_NGRAM_SIZE_N"),
         group=SPECULATIVE, metavar="N"),
    Flag(("--spec-ngram-size-m",), "ngram-simple: most tokens a match drafts", _POS, 48,
         env=_a("SPEC_NGRAM_SIZE_M"), group=SPECULATIVE, metavar="M"),
]


def build_parser() -> FlagParser:
    return FlagParser("llamarpc", DESCRIPTION, FLAGS)


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
    """--chat-template-file's text, else --chat-template, else None (the model's own); checked
    now: a template that does not compile or an unknown built-in name is a CLIError."""
    from ..model.chat_template import ChatTemplateError, check_template

    flag, text = "--chat-template", args.chat_template
    if args.chat_template_file:
        flag, text = "--chat-template-file", read_file("--chat-template-file", args.chat_template_file)
    if not text:
        return None
    try:
        return check_template(text)
    except ChatTemplateError as e:
        raise CLIError(f"{flag}: {e}") from None


def chat_template_kwargs_from_args(args: argparse.Namespace) -> dict:
    """--chat-template-kwargs as a dict (a CLIError unless it is a JSON object)."""
    if not args.chat_template_kwargs:
        return {}
    try:
        kw = json.loads(args.chat_template_kwargs)
    except json.JSONDecodeError as e:
        raise CLIError(f"--chat-template-kwargs: not valid JSON: {e}") from None
    if not isinstance(kw, dict):
        raise CLIError("--chat-template-kwargs must be a JSON object")
    if "enable_thinking" in kw and not isinstance(kw["enable_thinking"], bool):
        raise CLIError("--chat-template-kwargs: enable_thinking must be true or false")
    return kw
