"""``llamarpc-server``: a compute node on the network.

Flags have LLAMARPC_* environment equivalents (LLAMARPC_HOST, LLAMARPC_PORT, LLAMARPC_DEVICE,
LLAMARPC_THREADS, LLAMARPC_RESERVE_MEMORY, LLAMARPC_CACHE_DIR, LLAMARPC_AUTH_TOKEN_FILE,
LLAMARPC_TLS_CERT, LLAMARPC_TLS_KEY, LLAMARPC_MAX_SESSIONS, LLAMARPC_SESSIONS_PER_CLIENT,
LLAMARPC_SESSION_MEM, LLAMARPC_CLIENT_MEM, LLAMARPC_KEEPALIVE).

Fair sharing: at most --max-sessions sessions (each frontend holds one per node), at most
--sessions-per-client of them from one client address; a session's buffers may hold at most
--session-mem MiB and all sessions of one client address together at most --client-mem MiB. By
default both byte caps are half the capacity for clients on the network (a second client always
finds half the node) and off for clients on this machine (loopback, Unix sockets: they share one
address, and could take the machine's memory without the node); 0 turns a cap off, a number
applies to every client. A refused Hello or AllocBuffer is RESOURCE_EXHAUSTED naming the flag.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("llamarpc.server")


def _env(name: str, default: object = None) -> object:
    return os.environ.get(f"LLAMARPC_{name}", default)


def _opt_int(v: object) -> int | None:
    return None if v is None or v == "" else int(str(v))


def default_threads() -> int:
    """Half the cores (at least 1): a node should leave room for a frontend or a peer node on the
    same box; numpy's BLAS slows badly when oversubscribed."""
    return max(1, (os.cpu_count() or 2) // 2)


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "llamarpc", "tensors")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llamarpc-server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-H", "--host", default=_env("HOST", "127.0.0.1"), help="address to listen on (default 127.0.0.1)")
    p.add_argument("-p", "--port", type=int, default=int(_env("PORT", 50052)), help="port (default 50052; 0 = any)")
    p.add_argument("-d", "--device", default=_env("DEVICE", "cpu"), help="cpu or cuda:N (cupy; not yet verified on hardware)")
    p.add_argument("-t", "--threads", type=int, default=int(_env("THREADS", 0)),
                   help="compute threads, BLAS and the quantized kernels (default: half the cores)")
    p.add_argument("--matmul", choices=("exact", "fast", "reference"), default=_env("MATMUL", "exact"),
                   help="how to multiply by quantized weights: exact (float32 activations, the default), fast "
                        "(8-bit activations, as llama.cpp) or reference (numpy, slow)")
    p.add_argument("-m", "--reserve-memory", type=int, default=int(_env("RESERVE_MEMORY", 0)), metavar="MiB",
                   help="memory to keep free: capacity = total - reserve")
    p.add_argument("--mem", type=int, default=int(_env("MEM", 0)), metavar="MiB",
                   help="total memory to offer (default: the machine's physical memory)")
    p.add_argument("-c", "--cache-dir", default=_env("CACHE_DIR", default_cache_dir()),
                   help="on-disk weight cache ('' disables)")
    p.add_argument("--cache-size", type=int, default=int(_env("CACHE_SIZE", 65536)), metavar="MiB",
                   help="bound on the weight cache on disk; least recently used weights are evicted (default 65536)")
    p.add_argument("--auth-token-file", default=_env("AUTH_TOKEN_FILE"), help="file holding the shared secret")
    p.add_argument("--tls-cert", default=_env("TLS_CERT"), help="PEM certificate (with --tls-key: serve TLS)")
    p.add_argument("--tls-key", default=_env("TLS_KEY"), help="PEM private key")
    p.add_argument("--max-sessions", type=int, default=int(_env("MAX_SESSIONS", 16)), metavar="N",
                   help="sessions open at once, all clients together (default 16; each holds a server thread)")
    p.add_argument("--sessions-per-client", type=int, default=int(_env("SESSIONS_PER_CLIENT", 4)), metavar="N",
                   help="sessions one client address may hold (default 4)")
    p.add_argument("--session-mem", type=int, default=_opt_int(_env("SESSION_MEM")), metavar="MiB",
                   help="bytes one session may allocate (default: half the capacity for network clients, "
                        "no cap on loopback; 0 = no cap)")
    p.add_argument("--client-mem", type=int, default=_opt_int(_env("CLIENT_MEM")), metavar="MiB",
                   help="bytes all sessions of one client address may allocate together (default as --session-mem)")
    p.add_argument("--keepalive", type=float, default=float(_env("KEEPALIVE", 10.0)), metavar="S",
                   help="ping every client connection every S seconds and drop one that does not answer "
                        "within S, freeing its sessions (default 10; 1..3600)")
    p.add_argument("--port-file", default=None, help="write the bound port here once listening (for scripts/tests)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _cap_text(v: int | None, capacity: int) -> str:
    if v is None:
        return f"{capacity / 2**21:.1f} MiB off loopback, no cap on loopback"
    return "no cap" if v == 0 else f"{v / 2**20:.1f} MiB"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    threads = args.threads or default_threads()
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads)

    from . import quant
    from .node import Node, default_capacity

    quant.set_threads(threads)
    from .servicer import SessionLimits, make_server
    from .tensor_cache import TensorCache

    token = None
    if args.auth_token_file:
        token = Path(args.auth_token_file).read_text().strip()
        if not token:
            print(f"llamarpc-server: error: {args.auth_token_file} is empty", file=sys.stderr)
            return 2
    tls = None
    if bool(args.tls_cert) != bool(args.tls_key):
        print("llamarpc-server: error: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if args.tls_cert:
        tls = (Path(args.tls_key).read_bytes(), Path(args.tls_cert).read_bytes())
    if not _is_loopback(args.host) and not token:
        log.warning("listening on %s without --auth-token-file: anyone who can reach this port can allocate "
                    "memory and run computations on this machine; use a token (and TLS) off loopback", args.host)
    total = (args.mem << 20) if args.mem else default_capacity()
    capacity = total - (args.reserve_memory << 20)
    if capacity <= 0:
        print("llamarpc-server: error: --reserve-memory leaves no memory", file=sys.stderr)
        return 2
    try:
        node = Node(args.device, capacity, name=f"{args.host}:{args.port}", matmul_mode=args.matmul)
    except ValueError as e:
        print(f"llamarpc-server: error: {e}", file=sys.stderr)
        return 2
    try:
        limits = SessionLimits(max_sessions=args.max_sessions, sessions_per_client=args.sessions_per_client,
                               session_mem=None if args.session_mem is None else args.session_mem << 20,
                               client_mem=None if args.client_mem is None else args.client_mem << 20)
    except ValueError as e:
        print(f"llamarpc-server: error: {e}", file=sys.stderr)
        return 2
    cache = TensorCache(args.cache_dir or None, max_total=args.cache_size << 20)
    host = f"[{args.host}]" if ":" in args.host and not args.host.startswith("[") else args.host
    try:
        server, port, _ = make_server(node, f"{host}:{args.port}", cache=cache, token=token, tls=tls, limits=limits,
                                      keepalive=args.keepalive)
    except ValueError as e:
        print(f"llamarpc-server: error: {e}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as e:
        print(f"llamarpc-server: error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    server.start()
    log.info("llamarpc-server listening on %s:%d (device %s, %d threads, %s matmul, capacity %.1f MiB, cache %s, %s%s)",
             args.host, port, node.device.name, threads, args.matmul, capacity / 2**20, args.cache_dir or "off",
             "TLS" if tls else "plaintext", ", token auth" if token else "")
    log.info("sessions: %d at most, %d per client; per session %s, per client %s; keepalive %.0f s",
             limits.max_sessions, limits.sessions_per_client, _cap_text(limits.session_mem, capacity),
             _cap_text(limits.client_mem, capacity), args.keepalive)
    if args.port_file:
        Path(args.port_file).write_text(str(port))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=2).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
