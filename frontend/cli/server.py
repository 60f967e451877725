"""``llamarpc -m model.gguf`` without -p/--chat: the flags turned into the HTTP server's settings,
the loader it runs in the background (backends, model, engine with -np slots), and `serve`."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING

from llamarpc.proto.cliargs import CLIError, read_file

from .args import chat_template_from_args, chat_template_kwargs_from_args, sampling_from_args
from .setup import check_speculative_args, engine_config, load_from_args, rpc_secrets, set_threads, speculative_from_args

if TYPE_CHECKING:
    from ..api.server import Server
    from ..api.state import ServerSettings

log = logging.getLogger(__name__)


def _api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    keys: list[str] = []
    for k in args.api_key or []:
        keys += [x.strip() for x in k.split(",") if x.strip()]
    if args.api_key_file:
        for line in read_file("--api-key-file", args.api_key_file).splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(line)
    return tuple(keys)


def slot_save_path(value: str) -> str:
    """--slot-save-path: an existing directory (as llama-server checks it), or "" (off)."""
    if value and not os.path.isdir(value):
        raise CLIError(f"--slot-save-path: not a directory: {value}")
    return os.path.abspath(value) if value else ""


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """Every flag checked here, before anything loads: a bad value is a ValueError."""
    from ..api import ServerSettings

    sampling = sampling_from_args(args)
    template = chat_template_from_args(args)
    if bool(args.ssl_key_file) != bool(args.ssl_cert_file):
        raise CLIError("--ssl-key-file and --ssl-cert-file go together")
    for flag, path in (("--ssl-key-file", args.ssl_key_file), ("--ssl-cert-file", args.ssl_cert_file)):
        if path:
            read_file(flag, path, binary=True)
    if args.rpc:
        rpc_secrets(args)
    if args.reasoning_budget > 0:
        log.warning("--reasoning-budget %d: a token budget for thinking is not enforced here (thinking is "
                    "unrestricted); 0 disables thinking, -1 is unrestricted", args.reasoning_budget)
    aliases = tuple(a.strip() for a in (args.alias or "").split(",") if a.strip())
    origins = tuple(o.strip() for o in (args.cors_origins or "").split(",") if o.strip())
    return ServerSettings(
        model_path=args.model, aliases=aliases, n_parallel=args.parallel, n_predict=args.n_predict,
        sampling=sampling, chat_template=template, system_prompt=args.system_prompt, api_keys=_api_keys(args),
        metrics=args.metrics, slots=args.slots, webui=args.webui, timeout=args.timeout, cache_prompt=args.cache_prompt,
        ignore_eos=args.ignore_eos, cors_origins=origins, max_body=args.max_body, max_json_depth=args.max_json_depth,
        embeddings=args.embeddings or args.reranking, pooling="rank" if args.reranking else args.pooling,
        slot_save_path=slot_save_path(args.slot_save_path),
        chat_template_kwargs=chat_template_kwargs_from_args(args), reasoning_format=args.reasoning_format,
        reasoning_budget=args.reasoning_budget)


def make_server(args: argparse.Namespace) -> Server:
    """The server for these flags (nothing loaded yet: `run()` or `start()` loads in the background)."""
    from ..api.server import Listen, Server
    from ..engine import Engine
    from ..engine.embed import attach_embedder

    check_speculative_args(args)

    def load():
        model = load_from_args(args)
        log.info("placement:\n%s", model.pipeline.placement_table())
        engine = Engine(model, engine_config(args, args.parallel), speculative_from_args(args, model, args.parallel))
        if args.embeddings or args.reranking:
            attach_embedder(model, engine, "rank" if args.reranking else args.pooling)
        engine.start()
        return model, engine

    hosts = tuple(h.strip() for h in args.host.split(",") if h.strip())
    if not hosts:
        raise CLIError("--host needs at least one address")
    listen = Listen(hosts=hosts, port=args.port, ssl_keyfile=args.ssl_key_file, ssl_certfile=args.ssl_cert_file,
                    verbose=args.verbose)
    return Server(settings_from_args(args), listen, load)


def serve(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    try:
        server = make_server(args)
        server.bind()
    except (ValueError, OSError) as e:
        print(f"llamarpc: error: {e}", file=sys.stderr)
        return 2
    return server.run()
