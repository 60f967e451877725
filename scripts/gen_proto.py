#!/usr/bin/env python3
"""Regenerate proto/llamarpc_pb2*.py from proto/llamarpc.proto.

    python scripts/gen_proto.py            # rewrite the stubs in proto/
    python scripts/gen_proto.py --check    # exit 1 if the committed stubs are stale

The generated grpc module imports its sibling absolutely; we rewrite that import to be relative so
the stubs work as the package ``llamarpc.proto``.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUTPUTS = ("llamarpc_pb2.py", "llamarpc_pb2.pyi", "llamarpc_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc  # deferred: only this script needs grpcio-tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main([
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO_DIR / "llamarpc.proto"),
    ])
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    grpc_file = out_dir / "llamarpc_pb2_grpc.py"
    text = grpc_file.read_text()
    text = re.sub(r"^import llamarpc_pb2 as", "from . import llamarpc_pb2 as", text, flags=re.M)
    grpc_file.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare instead of writing")
    args = ap.parse_args()
    if not args.check:
        generate(PROTO_DIR)
        print("regenerated", ", ".join(OUTPUTS))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [n for n in OUTPUTS if (Path(tmp) / n).read_bytes() != (PROTO_DIR / n).read_bytes()]
    if stale:
        print("stale generated stubs:", ", ".join(stale), "- run scripts/gen_proto.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
