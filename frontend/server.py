"""``llamarpc -m model.gguf`` without -p/--chat: the HTTP server (FastAPI on uvicorn).

The port opens at once; the model loads in the background (every route but /health answers 503
"Loading model" meanwhile), then the engine starts."""
from __future__ import annotations

import argparse
import logging
import re
import threading
import time
from pathlib import Path

from .api import ServerSettings, ServerState, create_app
from .engine import Engine, EngineConfig
from .sampling import SamplingParams, samplers_from_chars, samplers_from_names

log = logging.getLogger(__name__)


def _api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    import os

    keys: list[str] = []
    for k in args.api_key or ([os.environ["LLAMA_API_KEY"]] if os.environ.get("LLAMA_API_KEY") else []):
        keys += [x.strip() for x in k.split(",") if x.strip()]
    if args.api_key_file:
        for line in Path(args.api_key_file).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(line)
    return tuple(keys)


def _logit_bias(specs: list[str] | None) -> tuple[tuple[int, float], ...]:
    out = []
    for spec in specs or []:
        m = re.fullmatch(r"\s*(\d+)\s*([+-])\s*(inf|[0-9.eE+-]+)\s*", spec)
        if not m:
            raise ValueError(f"--logit-bias {spec!r}: expected TOKEN_ID+BIAS or TOKEN_ID-BIAS")
        bias = float(m.group(3))
        out.append((int(m.group(1)), -bias if m.group(2) == "-" else bias))
    return tuple(out)


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """Every flag checked here, before anything loads: a bad value is a ValueError."""
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
    template = args.chat_template
    if args.chat_template_file:
        template = Path(args.chat_template_file).read_text()
    if args.parallel < 1:
        raise ValueError("--parallel must be at least 1")
    if bool(args.ssl_key_file) != bool(args.ssl_cert_file):
        raise ValueError("--ssl-key-file and --ssl-cert-file go together")
    return ServerSettings(
        model_path=args.model, alias=args.alias or "", n_parallel=args.parallel, n_predict=args.n_predict,
        sampling=sampling, chat_template=template, system_prompt=args.system_prompt, api_keys=_api_keys(args),
        metrics=args.metrics, slots=args.slots, timeout=args.timeout, cache_prompt=args.cache_prompt,
        ignore_eos=args.ignore_eos)


class Server:
    """The app, its uvicorn server and the background loader. `run()` blocks (the CLI);
    `start()` / `stop()` run it on a thread (tests, embedding)."""

    def __init__(self, args: argparse.Namespace) -> None:
        import uvicorn

        self.args = args
        self.settings = settings_from_args(args)
        self.state = ServerState(self.settings)
        self.app = create_app(self.state)
        self.config = uvicorn.Config(
            self.app, host=args.host, port=args.port, ssl_keyfile=args.ssl_key_file, ssl_certfile=args.ssl_cert_file,
            log_level="debug" if args.verbose else "warning", access_log=bool(args.verbose), lifespan="off",
            timeout_keep_alive=5)
        self.uvicorn = uvicorn.Server(self.config)
        self._thread: threading.Thread | None = None
        self._loader = threading.Thread(target=self._load, name="llamarpc-loader", daemon=True)

    def _load(self) -> None:
        from llamarpc.proto.errors import BackendError

        from .gguf_file import ModelLoadError
        from .model import load_model
        from .setup import kv_cache_type, make_backends

        args = self.args
        try:
            backends = make_backends(args)
            split = [float(x) for x in args.tensor_split.split(",")] if args.tensor_split else None
            model = load_model(args.model, backends, n_ctx=args.ctx_size, tensor_split=split,
                               kv_type=kv_cache_type(args))
            log.info("placement:\n%s", model.pipeline.placement_table())
            engine = Engine(model, EngineConfig(n_parallel=args.parallel, n_batch=args.batch_size,
                                                n_ubatch=args.ubatch_size, prefill_chunk=args.prefill_chunk))
            engine.start()
        except (ModelLoadError, ValueError, BackendError, OSError) as e:
            self.state.load_error = f"failed to load the model: {e}"
            log.error("%s", self.state.load_error)
            self.uvicorn.should_exit = True
            return
        self.state.attach(model, engine)
        log.info("model loaded: %d slots of %d tokens; listening on %s://%s:%d", len(engine.slots),
                 engine.n_ctx_slot, "https" if args.ssl_cert_file else "http", args.host, args.port)

    def run(self) -> int:
        self._loader.start()
        try:
            self.uvicorn.run()
        finally:
            self._shutdown()
        return 0 if self.state.load_error is None else 1

    def start(self, timeout: float = 120.0) -> None:
        self._loader.start()
        self._thread = threading.Thread(target=self.uvicorn.run, name="llamarpc-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not (self.uvicorn.started and self.state.ready):
            if self.state.load_error:
                raise RuntimeError(self.state.load_error)
            if time.monotonic() > deadline or (self._thread is not None and not self._thread.is_alive()):
                raise RuntimeError("the server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self._shutdown()

    def _shutdown(self) -> None:
        self._loader.join(60)
        if self.state.engine is not None:
            self.state.engine.stop()
        if self.state.model is not None:
            self.state.model.close()


def serve(args: argparse.Namespace) -> int:
    from .setup import set_threads

    set_threads(args.threads)
    try:
        server = Server(args)
    except (ValueError, OSError) as e:
        log.error("%s", e)
        return 2
    return server.run()
