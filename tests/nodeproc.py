"""Start and stop a real ``llamarpc-server`` subprocess on 127.0.0.1 for tests.

    node = start_node(tmp_path)                    # --port 0, -t 1, its own --cache-dir
    node = start_node(tmp_path, "--mem", "64")     # extra flags come last, so they win
    node.address   # "127.0.0.1:PORT"
    node.stop(); node.restart()                     # restart binds the same port
    node.kill9()                                    # SIGKILL, no clean shutdown

The node runs one BLAS thread (``-t 1``, OPENBLAS_NUM_THREADS=1) with stderr in a file
(``node.stderr_text()``). Readiness is the grpc health service answering SERVING (over TLS when
``--tls-cert`` is among the flags: that certificate is the root, for self-signed test certs).
Every channel here disables HTTP proxies: test traffic only ever goes to 127.0.0.1 (or a network
namespace the test made, tests/test_netns.py).
"""
from __future__ import annotations

import atexit
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

HOST = "127.0.0.1"
READY_TIMEOUT = 30.0
_counter = itertools.count()
_live: weakref.WeakSet[NodeProc] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    """A test run that dies half-way (Ctrl-C, a crash) leaves no node processes behind."""
    for node in list(_live):
        node.kill9()

__all__ = ["NodeProc", "start_node", "channel", "health_status"]


def channel(address: str, *, tls_ca: bytes | None = None, tls_server_name: str | None = None,
            options: list[tuple[str, object]] | None = None) -> grpc.Channel:
    """A channel to a test node that never goes through an HTTP proxy."""
    opts: list[tuple[str, object]] = [("grpc.enable_http_proxy", 0), *(options or [])]
    if tls_server_name:
        opts.append(("grpc.ssl_target_name_override", tls_server_name))
    if tls_ca is not None:
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=tls_ca), options=opts)
    return grpc.insecure_channel(address, options=opts)


def health_status(address: str, *, timeout: float = 2.0, tls_ca: bytes | None = None,
                  tls_server_name: str | None = None, service: str = "") -> int:
    """The health service's answer (health_pb2.HealthCheckResponse.SERVING == 1); raises grpc.RpcError."""
    with channel(address, tls_ca=tls_ca, tls_server_name=tls_server_name) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status


def _server_command() -> list[str]:
    script = Path(sys.executable).with_name("llamarpc-server")
    if script.exists():
        return [str(script)]
    found = shutil.which("llamarpc-server")
    return [found] if found else [sys.executable, "-m", "llamarpc.rpcserver.cli"]


def _flag_value(args: tuple[str, ...], flag: str) -> str | None:
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


class NodeProc:
    """One ``llamarpc-server`` process (and, after ``restart``, its successor on the same port)."""

    def __init__(self, workdir: Path, extra_args: tuple[str, ...], *, tls_ca: bytes | None = None,
                 tls_server_name: str | None = None, env: dict[str, str] | None = None,
                 ready_timeout: float = READY_TIMEOUT, host: str = HOST, wrap: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.host = host
        self.wrap = tuple(wrap)      # a command prefix, e.g. ("ip", "netns", "exec", NAME)
        self.extra_args = tuple(str(a) for a in extra_args)
        self.cache_dir = workdir / "cache"
        self.port_file = workdir / "port"
        self.stderr_path = workdir / "stderr.log"
        self.ready_timeout = ready_timeout
        cert = _flag_value(self.extra_args, "--tls-cert")
        self.tls_ca = tls_ca if tls_ca is not None or cert is None else Path(cert).read_bytes()
        self.tls_server_name = tls_server_name
        self._env = env
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- lifecycle --------------------------------------------------------------------------------
    def _start(self, port: int) -> None:
        self.port_file.unlink(missing_ok=True)
        cmd = [*self.wrap, *_server_command(), "--host", self.host, "--port", str(port), "--port-file", str(self.port_file),
               "-t", "1", "--cache-dir", str(self.cache_dir), *self.extra_args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMARPC_")}
        env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                   no_proxy="*", NO_PROXY="*")
        env.update(self._env or {})
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                         env=env, cwd=self.workdir)
        _live.add(self)
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self.proc is not None
        end = time.monotonic() + self.ready_timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llamarpc-server exited with {self.proc.returncode}:\n{self.stderr_text()}")
            text = self.port_file.read_text().strip() if self.port_file.exists() else ""
            if text.isdigit():
                self.port = int(text)
                try:
                    if health_status(self.address, tls_ca=self.tls_ca, tls_server_name=self.tls_server_name) == 1:
                        return
                except grpc.RpcError:
                    pass
            time.sleep(0.05)
        self.kill9()
        raise RuntimeError(f"llamarpc-server not ready within {self.ready_timeout:.0f} s:\n{self.stderr_text()}")

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        return self.proc.returncode

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> NodeProc:
        """Stop (if running) and start a fresh process on the same port, same flags and cache."""
        port = self.port
        self.stop()
        self._start(port)
        return self

    def __enter__(self) -> NodeProc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_node(tmp_path: Path | str, *extra_args: str, tls_ca: bytes | None = None,
               tls_server_name: str | None = None, env: dict[str, str] | None = None,
               ready_timeout: float = READY_TIMEOUT, host: str = HOST, wrap: tuple[str, ...] = ()) -> NodeProc:
    """Start ``llamarpc-server`` on 127.0.0.1 (a free port) and wait until it serves.

    Files (port file, stderr log, weight cache) go to a fresh directory under `tmp_path`. Extra
    flags follow the defaults, so e.g. ``"--host", "0.0.0.0"`` or ``"--cache-dir", ""`` override them.
    `host` binds another address and `wrap` prefixes the command (tests/test_netns.py runs a node
    in a network namespace: ``host="10.231.0.2", wrap=("ip", "netns", "exec", NAME)``).
    The caller stops it (``stop()``, or use it as a context manager)."""
    workdir = Path(tmp_path) / f"node{next(_counter)}"
    workdir.mkdir(parents=True, exist_ok=False)
    node = NodeProc(workdir, extra_args, tls_ca=tls_ca, tls_server_name=tls_server_name, env=env,
                    ready_timeout=ready_timeout, host=host, wrap=wrap)
    node._start(0)
    return node
