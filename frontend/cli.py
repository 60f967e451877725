"""``llamarpc``: one-shot generation (``-p`` / ``--chat``), like llama-cli.

Flags follow llama.cpp's names; each also reads its LLAMA_ARG_* environment variable.
"""
from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
from collections.abc import Sequence

from .setup import kv_cache_type, make_backends, set_threads

log = logging.getLogger("llamarpc")


def _env(name: str, default: object = None) -> object:
    return os.environ.get(f"LLAMA_ARG_{name}", default)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llamarpc", description=__doc__,
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
    from .server_args import add_server_args

    add_server_args(p)
    return p


def _piece(tok: object, tid: int | None) -> str:
    return "" if tid is None else tok.token_to_piece(tid).decode("utf-8", "replace")  # type: ignore[attr-defined]


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.model:
        print("llamarpc: error: -m/--model is required", file=sys.stderr)
        return 2
    if args.prompt is None and args.chat is None:
        from .server import serve

        return serve(args)
    set_threads(args.threads)

    from llamarpc.proto.errors import BackendError

    from .chat_template import ChatTemplateError, render_chat
    from .generate import Generator
    from .gguf_file import ModelLoadError
    from .model import load_model
    from .progress import ProgressBar
    from .sampling import Sampler, SamplingParams

    try:
        backends = make_backends(args)
        split = [float(x) for x in args.tensor_split.split(",")] if args.tensor_split else None
        with ProgressBar("loading weights") as bar:
            model = load_model(args.model, backends, n_ctx=args.ctx_size, tensor_split=split, progress=bar.update,
                               kv_type=kv_cache_type(args))
    except (ModelLoadError, ValueError, BackendError) as e:
        print(f"llamarpc: error: {e}", file=sys.stderr)
        return 1
    log.info("placement:\n%s", model.pipeline.placement_table())
    tok = model.tokenizer
    try:
        if args.chat is not None:
            template = args.chat_template or model.chat_template
            messages = ([{"role": "system", "content": args.system_prompt}] if args.system_prompt else [])
            messages.append({"role": "user", "content": args.chat})
            text = render_chat(template, messages, add_generation_prompt=True,
                               bos_token=_piece(tok, tok.bos_id), eos_token=_piece(tok, tok.eos_id))
            prompt = tok.encode(text, add_special=False, parse_special=True)
        else:
            text = args.prompt
            prompt = tok.encode(text, add_special=True, parse_special=True)
        sampler = Sampler(SamplingParams(args.temp, args.top_k, args.top_p, args.min_p, args.seed))
        gen = Generator(model, n_batch=args.batch_size)
        if args.prompt is not None and not args.no_display_prompt:
            sys.stdout.write(args.prompt)
            sys.stdout.flush()
        dec = tok.streaming_decoder()
        for t in gen.generate(prompt, args.n_predict, sampler, ignore_eos=args.ignore_eos):
            sys.stdout.write(dec.feed(t))
            sys.stdout.flush()
        sys.stdout.write(dec.flush() + "\n")
        sys.stdout.flush()
    except (ValueError, ChatTemplateError, BackendError) as e:
        print(f"llamarpc: error: {e}", file=sys.stderr)
        return 1
    finally:
        model.close()
    t = gen.timings
    print(f"\nload time        = {model.load_seconds * 1000:10.2f} ms\n"
          f"prompt eval time = {t.prompt_seconds * 1000:10.2f} ms / {t.n_prompt:5d} tokens "
          f"({t.prompt_tps:8.2f} tokens per second)\n"
          f"eval time        = {t.gen_seconds * 1000:10.2f} ms / {t.n_gen:5d} tokens "
          f"({t.gen_tps:8.2f} tokens per second)\n"
          f"peak RSS         = {_peak_rss_mib():10.1f} MiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
