"""``llamarpc``: the entry point. With -p / --chat it runs one generation (`oneshot`), without
them it serves HTTP (`server`)."""
from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from .args import build_parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.model:
        print("llamarpc: error: -m/--model is required (or LLAMA_ARG_MODEL)", file=sys.stderr)
        return 2
    if args.prompt is None and args.chat is None:
        from .server import serve

        return serve(args)
    from .oneshot import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
