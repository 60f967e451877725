"""Helpers for the server tests: a real uvicorn server on a free loopback port (in a thread, or as
the `llamarpc` CLI in a subprocess), and a small SSE reader."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(argv: list[str]):
    """`llamarpc <argv> --port <free>` as a Server on threads; returns (server, base_url)."""
    from llamarpc.frontend.cli.args import build_parser
    from llamarpc.frontend.cli.server import make_server

    port = free_port()
    args = build_parser().parse_args([*argv, "--host", "127.0.0.1", "--port", str(port)])
    srv = make_server(args)
    srv.start()
    scheme = "https" if args.ssl_cert_file else "http"
    return srv, f"{scheme}://127.0.0.1:{port}"


class AppThread:
    """Any ASGI app on uvicorn in a thread (for states built by hand: loading, a flaky node)."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def cli_server(argv: list[str], env: dict[str, str] | None = None, port: int | None = None):
    """The real CLI in a subprocess; waits for /health to answer 200. Returns (proc, base_url)."""
    import os

    port = port or free_port()
    full_env = {**os.environ, **(env or {})}
    cmd = [sys.executable, "-m", "llamarpc.frontend.cli", *argv]
    if "LLAMA_ARG_PORT" not in (env or {}):
        cmd += ["--port", str(port)]
    proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not become healthy")


def sse_events(lines: Iterator[str]) -> Iterator[dict | str]:
    """Parse `data: ...` lines; yields dicts, or the string "[DONE]"."""
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[6:]
        yield "[DONE]" if data == "[DONE]" else json.loads(data)


def make_cert(tmp: Path) -> tuple[Path, Path] | None:
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                        "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return key, cert
