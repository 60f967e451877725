"""``llamarpc-server``: a compute node on the network.

Every flag has an LLAMARPC_* environment variable (listed below); the flag table goes through the
shared argument layer (`llamarpc.proto.cliargs`), as llamarpc's does.

Fair sharing: at most --max-sessions sessions (each frontend holds one per node), at most
--sessions-per-client of them from one client address; a session's buffers may hold at most
--session-mem MiB and all sessions of one client address together at most --client-mem MiB. By
default both byte caps are half the capacity for clients on the network (a second client always
finds half the node) and off for clients on this machine (loopback, Unix sockets: they share one
address, and could take the machine's memory without the node); 0 turns a cap off, a number
applies to every client. A refused Hello or AllocBuffer is RESOURCE_EXHAUSTED naming the flag.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from llamarpc.proto.cliargs import CLIError, Flag, FlagParser, ranged, read_file

log = logging.getLogger("llamarpc.server")


def _e(name: str) -> str:
    return f"LLAMARPC_{name}"


def default_threads() -> int:
    """Half the cores (at least 1): a node should leave room for a frontend or a peer node on the
    same box; numpy's BLAS slows badly when oversubscribed."""
    return max(1, (os.cpu_count() or 2) // 2)


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "llamarpc", "tensors")


_MIB = ranged(int, 0, 1 << 40)
FLAGS: list[Flag] = [
    Flag(("-H", "--host"), "address to listen on", str, "127.0.0.1", env=_e("HOST")),
    Flag(("-p", "--port"), "port (0 = any free one)", ranged(int, 0, 65535), 50052, env=_e("PORT")),
    Flag(("-d", "--device"), "cpu or cuda:N (cupy)", str, "cpu", env=_e("DEVICE")),
    Flag(("-t", "--threads"), "compute threads, BLAS and the quantized kernels; 0 = half the cores",
         ranged(int, 0, 4096), 0, env=_e("THREADS"), metavar="N"),
    Flag(("--matmul",), "how to multiply by quantized weights: exact (float32 activations), fast (8-bit "
         "activations, as llama.cpp) or reference (numpy, slow)", str, "exact", env=_e("MATMUL"),
         choices=("exact", "fast", "reference")),
    Flag(("-m", "--reserve-memory"), "memory to keep free: capacity = total - reserve", _MIB, 0,
         env=_e("RESERVE_MEMORY"), metavar="MiB"),
    Flag(("--mem",), "total memory to offer; 0 = the machine's physical memory", _MIB, 0, env=_e("MEM"),
         metavar="MiB"),
    Flag(("-c", "--cache-dir"), "on-disk weight cache ('' disables)", str, None, env=_e("CACHE_DIR"),
         metavar="DIR"),
    Flag(("--cache-size",), "bound on the weight cache on disk; least recently used weights are evicted",
         ranged(int, 1, 1 << 40), 65536, env=_e("CACHE_SIZE"), metavar="MiB"),
    Flag(("--auth-token-file",), "file holding the shared secret", env=_e("AUTH_TOKEN_FILE"), metavar="FNAME"),
    Flag(("--tls-cert",), "PEM certificate (with --tls-key: serve TLS)", env=_e("TLS_CERT"), metavar="FNAME"),
    Flag(("--tls-key",), "PEM private key", env=_e("TLS_KEY"), metavar="FNAME"),
    Flag(("--max-sessions",), "sessions open at once, all clients together (each holds a server thread)",
         ranged(int, 1, 1024), 16, env=_e("MAX_SESSIONS"), metavar="N"),
    Flag(("--sessions-per-client",), "sessions one client address may hold", ranged(int, 1, 1024), 4,
         env=_e("SESSIONS_PER_CLIENT"), metavar="N"),
    Flag(("--session-mem",), "bytes one session may allocate (default: half the capacity for network clients, "
         "no cap on loopback; 0 = no cap)", _MIB, None, env=_e("SESSION_MEM"), metavar="MiB"),
    Flag(("--client-mem",), "bytes all sessions of one client address may allocate together (default as "
         "--session-mem)", _MIB, None, env=_e("CLIENT_MEM"), metavar="MiB"),
    Flag(("--keepalive",), "ping every client connection every S seconds and drop one that does not answer "
         "within S, freeing its sessions", ranged(float, 1.0, 3600.0), 10.0, env=_e("KEEPALIVE"), metavar="S"),
    Flag(("--metrics-port",), "serve the node's own /metrics (Prometheus) on this port of --host, with the token "
         "and TLS of the gRPC port; off by default (0 = any free port)", ranged(int, 0, 65535), None,
         env=_e("METRICS_PORT"), metavar="PORT"),
    Flag(("--port-file",), "write the bound port here once listening (for scripts/tests)", metavar="FNAME"),
    Flag(("-v", "--verbose"), "debug logging", None, False, env=_e("VERBOSE")),
]

MODES = """modes:
  node       llamarpc-server [-H 0.0.0.0] [-p 50052] [-d cpu|cuda:0]     this command: one compute node
  frontend   llamarpc -m MODEL.gguf --rpc HOST:50052,HOST2:50052 [-p PROMPT]   places a model's layers on nodes
             (with -p a one-shot run, without it the HTTP server)

Here -p is the port, -m --reserve-memory and -c --cache-dir, as in llama.cpp's rpc-server; on
llamarpc (the frontend) -p is the prompt, -m the model and -c the context size, as in llama.cpp.
"""


def build_parser() -> FlagParser:
    return FlagParser("llamarpc-server", (__doc__ or "") + "\n" + MODES, FLAGS)


def _port_busy(host: str, port: int) -> str | None:
    """Why `host:port` cannot be bound, found with a plain socket before gRPC tries (its C core
    would print its own add_port.cc error line first)."""
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        return f"cannot resolve {host}: {e.strerror or e}"
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # as gRPC binds: a port whose old connections linger in TIME_WAIT (a node just restarted
        # on it) is free; one with a listener is not
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            return e.strerror or str(e)
    return None


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
    tls = None
    try:
        if args.auth_token_file:
            token = read_file("--auth-token-file", args.auth_token_file).strip()
            if not token:
                raise CLIError(f"--auth-token-file {args.auth_token_file}: the file is empty")
        if bool(args.tls_cert) != bool(args.tls_key):
            raise CLIError("--tls-cert and --tls-key go together")
        if args.tls_cert:
            tls = (read_file("--tls-key", args.tls_key, binary=True), read_file("--tls-cert", args.tls_cert, binary=True))
    except CLIError as e:
        print(f"llamarpc-server: error: {e}", file=sys.stderr)
        return 2
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
    cache_dir = default_cache_dir() if args.cache_dir is None else args.cache_dir
    cache = TensorCache(cache_dir or None, max_total=args.cache_size << 20)
    host = f"[{args.host}]" if ":" in args.host and not args.host.startswith("[") else args.host
    busy = _port_busy(args.host, args.port)
    if busy:
        print(f"llamarpc-server: error: cannot listen on {args.host}:{args.port}: {busy}", file=sys.stderr)
        return 1
    try:
        server, port, _ = make_server(node, f"{host}:{args.port}", cache=cache, token=token, tls=tls, limits=limits,
                                      keepalive=args.keepalive)
    except ValueError as e:
        print(f"llamarpc-server: error: {e}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as e:
        print(f"llamarpc-server: error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    metrics = None
    if args.metrics_port is not None:
        from .metrics import MetricsServer

        try:
            metrics = MetricsServer(node, args.host, args.metrics_port, token=token, max_sessions=args.max_sessions,
                                    tls_files=(args.tls_cert, args.tls_key) if tls else None)
        except OSError as e:
            print(f"llamarpc-server: error: --metrics-port: cannot listen on {args.host}:{args.metrics_port}: "
                  f"{e.strerror or e}", file=sys.stderr)
            return 1
    server.start()
    if metrics is not None:
        metrics.start()
        log.info("metrics on %s://%s:%d/metrics%s", "https" if metrics.tls else "http", host, metrics.port,
                 " (token required)" if token else "")
    log.info("llamarpc-server listening on %s:%d (device %s, %d threads, %s matmul, capacity %.1f MiB, cache %s, %s%s)",
             args.host, port, node.device.name, threads, args.matmul, capacity / 2**20, cache_dir or "off",
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
    if metrics is not None:
        metrics.stop()
    server.stop(grace=2).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
