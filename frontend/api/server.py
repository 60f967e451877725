"""The HTTP server: the app on uvicorn, with the model loading in the background.

The port opens at once; the model loads on a thread (every route but /health answers 503
"Loading model" meanwhile), then the engine starts. `run()` blocks (the CLI); `start()` /
`stop()` run it on a thread (tests, embedding)."""
from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
from collections.abc import Callable

from llamarpc.proto.errors import BackendError

from ..engine import Engine, Model
from ..model.gguf_file import ModelLoadError
from .app import create_app
from .state import ServerSettings, ServerState

log = logging.getLogger(__name__)

Loader = Callable[[], tuple[Model, Engine]]   # load the model, start its engine


@dataclasses.dataclass
class Listen:
    hosts: tuple[str, ...] = ("127.0.0.1",)    # --host a,b: one socket per address, all on `port`
    port: int = 8080
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    verbose: bool = False


class Server:
    def __init__(self, settings: ServerSettings, listen: Listen, load: Loader) -> None:
        import uvicorn

        self.settings = settings
        self.listen = listen
        self._load_fn = load
        self.state = ServerState(settings)
        self.app = create_app(self.state)
        self.config = uvicorn.Config(
            self.app, host=listen.hosts[0], port=listen.port, ssl_keyfile=listen.ssl_keyfile,
            ssl_certfile=listen.ssl_certfile, log_level="debug" if listen.verbose else "warning",
            access_log=bool(listen.verbose), lifespan="off", timeout_keep_alive=5)
        self.uvicorn = uvicorn.Server(self.config)
        self._thread: threading.Thread | None = None
        self._sockets: list[socket.socket] | None = None
        self._loader = threading.Thread(target=self._load, name="llamarpc-loader", daemon=True)

    def _load(self) -> None:
        try:
            model, engine = self._load_fn()
        except (ModelLoadError, ValueError, BackendError, OSError) as e:
            self.state.load_error = f"failed to load the model: {e}"
            log.error("%s", self.state.load_error)
            self.uvicorn.should_exit = True
            return
        self.state.attach(model, engine)
        lst = self.listen
        log.info("model loaded: %d slots of %d tokens; listening on %s://%s:%d", len(engine.slots),
                 engine.n_ctx_slot, "https" if lst.ssl_certfile else "http", ",".join(lst.hosts), lst.port)

    def bind(self) -> list[socket.socket]:
        """One listening socket per --host address (an OSError names the address that failed)."""
        if self._sockets is None:
            socks: list[socket.socket] = []
            try:
                for host in self.listen.hosts:
                    h = host.strip("[]")
                    infos = socket.getaddrinfo(h, self.listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
                    family, _, _, _, addr = infos[0]
                    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on an accepted connection only when its
                    # socket says TCP, and without it a keep-alive response waits ~40 ms (Nagle + delayed ACK)
                    s = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    try:
                        s.bind(addr)
                    except OSError as e:
                        s.close()
                        raise OSError(f"cannot listen on {host}:{self.listen.port}: {e.strerror or e}") from None
                    s.listen(2048)
                    s.set_inheritable(True)
                    socks.append(s)
            except (OSError, socket.gaierror) as e:
                for s in socks:
                    s.close()
                raise OSError(str(e)) from None
            self._sockets = socks
        return self._sockets

    def run(self) -> int:
        sockets = self.bind()
        self._loader.start()
        try:
            self.uvicorn.run(sockets=sockets)
        finally:
            self._shutdown()
        return 0 if self.state.load_error is None else 1

    def start(self, timeout: float = 120.0) -> None:
        sockets = self.bind()
        self._loader.start()
        self._thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": sockets}, name="llamarpc-http",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not (self.uvicorn.started and self.state.ready):
            if self.state.load_error:
                raise RuntimeError(self.state.load_error)
            if time.monotonic() > deadline or (self._thread is not None and not self._thread.is_alive()):
                raise RuntimeError("the server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self._shutdown()

    def _shutdown(self) -> None:
        self._loader.join(60)
        if self.state.engine is not None:
            self.state.engine.stop()
            if self.state.engine.spec is not None:
                self.state.engine.spec.close()     # the draft model's nodes
        if self.state.model is not None:
            self.state.model.close()
