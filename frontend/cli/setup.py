"""What the one-shot mode and the server both set up from the parsed flags: threads, backends, the
KV cache type, the model loaded and placed, the engine's configuration."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from llamarpc.proto.cliargs import CLIError, file_problem, read_file

if TYPE_CHECKING:   # numpy (under proto.types) is imported only after the BLAS thread limit is set
    from llamarpc.proto.types import GGMLType

    from ..engine import EngineConfig, Model
    from ..engine.pipeline import Progress
    from ..engine.speculative import Speculative


def set_threads(threads: int) -> None:
    """-t N: BLAS and the in-process node's kernels use N threads (0: all cores)."""
    if threads > 0:
        from llamarpc.client.local import set_threads as set_local_threads

        set_local_threads(threads)


def kv_cache_type(args: argparse.Namespace) -> GGMLType:
    """-ctk/-ctv as a GGML type; K and V share one type in this engine."""
    from llamarpc.proto.types import GGMLType

    k = args.cache_type_k
    v = args.cache_type_v or k
    if v != k:
        raise ValueError(f"-ctk {k} and -ctv {v} differ; K and V share one cache type here")
    return GGMLType.F16 if k == "f16" else GGMLType.F32


def rpc_secrets(args: argparse.Namespace) -> tuple[str | None, bytes | None]:
    """--rpc-token-file's token and --rpc-tls-ca's certificate (a CLIError names a bad file)."""
    token = read_file("--rpc-token-file", args.rpc_token_file).strip() if args.rpc_token_file else None
    if token == "":
        raise CLIError(f"--rpc-token-file {args.rpc_token_file}: the file is empty")
    ca = read_file("--rpc-tls-ca", args.rpc_tls_ca, binary=True) if args.rpc_tls_ca else None
    return token, ca


def make_backends(args: argparse.Namespace) -> list:
    """The --rpc nodes, or one in-process node (--device, --matmul) when there are none."""
    return backends_for(args, args.rpc, "--rpc")


def backends_for(args: argparse.Namespace, rpc: str | None, flag: str) -> list:
    """The nodes listed in `rpc` (flag `flag`: --rpc, --rpc-draft), or one in-process node."""
    if not rpc:
        from llamarpc.client.local import LocalBackend

        return [LocalBackend(args.device, matmul_mode=args.matmul)]
    from llamarpc.client.remote import RemoteBackend

    token, ca = rpc_secrets(args)
    addrs = [a.strip() for a in rpc.split(",") if a.strip()]
    if not addrs:
        raise ValueError(f"{flag} needs at least one HOST:PORT")
    return [RemoteBackend(a, token=token, tls_ca=ca) for a in addrs]


def _scaled(item: list[str]) -> list[tuple[str, str]]:
    """--lora-scaled's words as (path, scale text): FNAME SCALE, or FNAME:SCALE[,...]."""
    if len(item) == 2:
        return [(item[0], item[1])]
    if len(item) == 1 and ":" in item[0]:
        return [(p.rsplit(":", 1)[0], p.rsplit(":", 1)[1]) for p in item[0].split(",") if p.strip()]
    raise CLIError(f"--lora-scaled {' '.join(item)}: expected FNAME SCALE or FNAME:SCALE[,...]")


def lora_specs(args: argparse.Namespace) -> list[tuple[str, float]]:
    """--lora FNAME[,FNAME] and --lora-scaled FNAME SCALE / FNAME:SCALE[,...] as (path, scale) in
    command-line order (the adapters' ids); --lora-init-without-apply makes every scale 0. A bad
    scale or a missing file is a CLIError naming the flag."""
    out: list[tuple[str, float]] = []
    for item in args.lora or []:
        if isinstance(item, str):       # --lora
            flag, pairs = "--lora", [(p.strip(), "1") for p in item.split(",") if p.strip()]
        else:
            flag, pairs = "--lora-scaled", _scaled(item)
        for path, text in pairs:
            try:
                scale = float(text)
            except ValueError:
                scale = float("nan")
            if scale != scale or abs(scale) == float("inf"):
                raise CLIError(f"{flag} {path}: scale {text!r} is not a finite number")
            problem = file_problem(path)
            if problem:
                raise CLIError(f"{flag} {path}: {problem}")
            out.append((path, 0.0 if args.lora_init_without_apply else scale))
    return out


def load_from_args(args: argparse.Namespace, progress: Progress | None = None) -> Model:
    """-m on the backends of --rpc (or in process), -c, -ts, -ctk/-ctv, --lora*."""
    from ..engine import load_model

    lora = lora_specs(args)
    backends = make_backends(args)
    split = [float(x) for x in args.tensor_split.split(",")] if args.tensor_split else None
    return load_model(args.model, backends, n_ctx=args.ctx_size, tensor_split=split, progress=progress,
                      kv_type=kv_cache_type(args), lora=lora)


def engine_config(args: argparse.Namespace, n_parallel: int, warmup: bool = True) -> EngineConfig:
    """-b, -ub, -pc, --node-grace for `n_parallel` slots."""
    from ..engine import EngineConfig

    return EngineConfig(n_parallel=n_parallel, n_batch=args.batch_size, n_ubatch=args.ubatch_size,
                        prefill_chunk=args.prefill_chunk, node_grace=args.node_grace, warmup=warmup,
                        context_shift=args.context_shift)


def check_speculative_args(args: argparse.Namespace) -> None:
    """The draft bounds, before anything loads (a CLIError naming the flags)."""
    if args.draft_min > args.draft_max:
        raise CLIError(f"--draft-min {args.draft_min} is larger than --draft-max {args.draft_max}")


def speculative_from_args(args: argparse.Namespace, model: Model, n_parallel: int) -> Speculative | None:
    """--spec-type and -md (both may be given: the n-gram lookup drafts first, as in llama.cpp), the
    draft model loaded on --rpc-draft's nodes or in process; None without either."""
    from ..engine.speculative import ModelDrafter, NgramDrafter, SpecParams, Speculative, check_vocab

    check_speculative_args(args)
    drafters: list = []
    if args.spec_type == "ngram-simple":
        drafters.append(NgramDrafter(args.spec_ngram_size_n, args.spec_ngram_size_m))
    if args.model_draft:
        from ..engine import load_model

        draft = load_model(args.model_draft, backends_for(args, args.rpc_draft, "--rpc-draft"),
                           n_ctx=args.ctx_size_draft or model.n_ctx, kv_type=kv_cache_type(args))
        try:
            check_vocab(model.tokenizer, draft.tokenizer)
        except ValueError as e:
            draft.close()
            raise CLIError(f"-md {args.model_draft}: {e}") from None
        drafters.append(ModelDrafter(draft, n_parallel, args.ubatch_size))
    if not drafters:
        return None
    params = SpecParams(args.draft_max, args.draft_min, args.draft_p_min)
    return Speculative(drafters, params, model.n_vocab)
