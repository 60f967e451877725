"""One-shot generation (``llamarpc -m M -p PROMPT`` or ``--chat QUESTION``), like llama-cli: the
prompt goes to the engine as one task on one slot, the same path the server's requests take, and
its tokens are printed as they come (the prompt echoed first), then the timings on stderr."""
from __future__ import annotations

import argparse
import logging
import resource
import sys

from .args import chat_template_from_args, chat_template_kwargs_from_args, sampling_from_args
from .setup import engine_config, load_from_args, set_threads, speculative_from_args

log = logging.getLogger("llamarpc")


def _piece(tok: object, tid: int | None) -> str:
    return "" if tid is None else tok.token_to_piece(tid).decode("utf-8", "replace")  # type: ignore[attr-defined]


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _error(e: object) -> int:
    print(f"llamarpc: error: {e}", file=sys.stderr)
    return 1


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)

    from llamarpc.proto.errors import BackendError

    from ..engine import Engine, ErrorEvent, FinalEvent, PartialEvent, TaskParams
    from ..model.chat_template import ChatTemplateError, render_chat
    from ..model.gguf_file import ModelLoadError
    from .progress import ProgressBar

    try:
        sampling = sampling_from_args(args)
        template = chat_template_from_args(args)
        template_vars = {"enable_thinking": args.reasoning_budget != 0, **chat_template_kwargs_from_args(args)}
        with ProgressBar("loading weights") as bar:
            model = load_from_args(args, progress=bar.update)
    except (ModelLoadError, ValueError, BackendError, OSError) as e:
        return _error(e)
    log.info("placement:\n%s", model.pipeline.placement_table())
    tok = model.tokenizer
    engine = None
    final = None
    n_gen = 0
    try:
        if args.chat is not None:
            messages = ([{"role": "system", "content": args.system_prompt}] if args.system_prompt else [])
            messages.append({"role": "user", "content": args.chat})
            text = render_chat(template or model.chat_template, messages, add_generation_prompt=True,
                               bos_token=_piece(tok, tok.bos_id), eos_token=_piece(tok, tok.eos_id), **template_vars)
            prompt = tok.encode(text, add_special=False, parse_special=True)
        else:
            prompt = tok.encode(args.prompt, add_special=True, parse_special=True)
        params = TaskParams(sampling=sampling, n_predict=args.n_predict, ignore_eos=args.ignore_eos,
                            cache_prompt=False)
        # one slot; no warm-up: its one-time costs land in the first step, as the timings always showed
        engine = Engine(model, engine_config(args, 1, warmup=False), speculative_from_args(args, model, 1))
        engine.start()
        if args.prompt is not None and not args.no_display_prompt:
            sys.stdout.write(args.prompt)
            sys.stdout.flush()
        dec = tok.streaming_decoder()
        for ev in engine.stream(prompt, params):
            if isinstance(ev, ErrorEvent):
                return _error(ev.message)
            if isinstance(ev, FinalEvent):
                final = ev
                continue
            assert isinstance(ev, PartialEvent)
            for t in ev.tokens:
                if tok.is_eog(t):       # the end of the generation: never printed, never counted
                    continue
                n_gen += 1
                sys.stdout.write(dec.feed(t))
            sys.stdout.flush()
        sys.stdout.write(dec.flush() + "\n")
        sys.stdout.flush()
    except (ValueError, ChatTemplateError, BackendError) as e:
        return _error(e)
    finally:
        if engine is not None:
            engine.stop()
            if engine.spec is not None:
                engine.spec.close()
        model.close()
    t = final.timings
    prompt_s, gen_s = t.prompt_ms / 1e3, t.predicted_ms / 1e3
    print(f"\nload time        = {model.load_seconds * 1000:10.2f} ms\n"
          f"prompt eval time = {t.prompt_ms:10.2f} ms / {t.prompt_n:5d} tokens "
          f"({t.prompt_n / prompt_s if prompt_s else 0.0:8.2f} tokens per second)\n"
          f"eval time        = {t.predicted_ms:10.2f} ms / {n_gen:5d} tokens "
          f"({n_gen / gen_s if gen_s else 0.0:8.2f} tokens per second)\n"
          f"peak RSS         = {_peak_rss_mib():10.1f} MiB", file=sys.stderr)
    if t.draft_n:       # as llama.cpp prints it
        print(f"draft acceptance rate = {t.draft_n_accepted / t.draft_n:.5f} ({t.draft_n_accepted:5d} accepted / "
              f"{t.draft_n:5d} generated)", file=sys.stderr)
    return 0
