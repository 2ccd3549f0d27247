"""Running the app: in the foreground (``parallm serve``) or in a background thread (tests, the
load test, benchmarks); and starting its engine, in its own process or in this one."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import threading
import time
from types import TracebackType
from typing import Any

import uvicorn
from fastapi import FastAPI

from parallm.engine.core import replicas
from parallm.engine.core.client import EngineCoreClient
from parallm.engine.engine import LLMEngine

logger = logging.getLogger("parallm.server")

_BACKLOG = 2048  # uvicorn's default
# Past the drain deadline the app aborts its requests, and each stream then sends its last
# chunk and [DONE]; uvicorn cancels whatever is still open this much later, as a last resort.
_ABORT_GRACE_S = 2.0


def load_engine(**engine_kwargs: Any) -> LLMEngine:
    """An engine from ``LLM``'s keyword arguments (model dir, or config file + dummy weights)."""
    from parallm.llm import LLM

    return LLM(**engine_kwargs).engine


def start_engine_core(num_threads: int | None = None, **engine_kwargs: Any) -> EngineCoreClient:
    """An engine core in its own process from ``LLM``'s keyword arguments; returns once it is
    loaded (its start-up error is raised here)."""
    return EngineCoreClient(engine_kwargs, num_threads=num_threads)


def start_engine_cores(
    num_threads: int | None = None, **engine_kwargs: Any
) -> list[EngineCoreClient]:
    """One engine core per data-parallel replica (``data_parallel_size``, default 1), each in
    its own process on its own devices; returns once all are loaded (the first start-up error
    is raised here, naming its replica, after the others are stopped)."""
    return replicas.start_engine_cores(engine_kwargs, num_threads=num_threads)


def engine_failure(app: Any) -> str | None:
    """Why the app's engine core died, or None (also for an app without an engine)."""
    check = getattr(getattr(app, "state", None), "engine_error", None)
    return check() if check is not None else None


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket; port 0 picks a free one without a race."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    # Listening now, not when uvicorn gets to it, queues early clients instead of refusing them.
    sock.listen(_BACKLOG)
    return sock


class DrainingServer(uvicorn.Server):
    """uvicorn's graceful shutdown with an end for the requests that outlast the drain.

    On SIGTERM uvicorn stops accepting and waits for open requests. At ``drain_timeout_s`` the
    app's ``state.abort_all_requests`` (when it has one) aborts what is still running, so each
    stream ends with finish_reason "abort" and [DONE] instead of being cut; uvicorn's own
    cancellation follows ``_ABORT_GRACE_S`` later for anything still open. Then the app's
    shutdown stops the engine. ``drain_timeout_s=None`` waits for as long as requests run.
    If the engine core dies, the server shuts down the same way (its requests have failed).
    """

    def __init__(
        self, app: FastAPI, drain_timeout_s: float | None, log_level: str, access_log: bool = True
    ) -> None:
        cancel_after = None if drain_timeout_s is None else drain_timeout_s + _ABORT_GRACE_S
        # "auto": uvloop and httptools when importable (as vLLM's server), else asyncio and h11.
        super().__init__(uvicorn.Config(
            app, log_level=log_level, timeout_graceful_shutdown=cancel_after,
            timeout_keep_alive=5, access_log=access_log, loop="auto", http="auto",
        ))  # fmt: skip
        self.drain_timeout_s = drain_timeout_s
        self._abort_all = getattr(app.state, "abort_all_requests", None)
        self._app = app

    async def on_tick(self, counter: int) -> bool:
        if not self.should_exit and engine_failure(self._app) is not None:
            logger.error("the engine core died; shutting the server down")
            self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        deadline = None
        if self.drain_timeout_s is not None and self._abort_all is not None:
            loop = asyncio.get_running_loop()
            deadline = loop.call_later(self.drain_timeout_s, self._abort_all)
        try:
            await super().shutdown(sockets)
        finally:
            if deadline is not None:
                deadline.cancel()


def run_server(
    app: FastAPI,
    host: str,
    port: int,
    drain_timeout_s: float,
    log_level: str = "info",
    access_log: bool = True,
) -> None:
    """Serve until SIGINT/SIGTERM, then drain and return. Prints the URL once listening.
    ``access_log=False`` drops uvicorn's line per request."""
    server = DrainingServer(app, drain_timeout_s, log_level, access_log)
    sock = bind_socket(host, port)
    bound = sock.getsockname()[1]  # the real port when port is 0
    print(f"parallm: serving on http://{host}:{bound}/v1", file=sys.stderr, flush=True)
    # uvicorn re-raises the signal it caught once it has shut down; with the default SIGTERM
    # action that would kill the process after a clean drain, so make it a no-op here.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run(sockets=[sock])


class ServerThread:
    """The app served by uvicorn on a background thread, on loopback by default.

    ``with ServerThread(app) as server: OpenAI(base_url=server.url + "/v1", ...)``.
    """

    def __init__(
        self,
        app: FastAPI,
        host: str = "127.0.0.1",
        port: int = 0,
        drain_timeout_s: float | None = 5.0,
        log_level: str = "warning",
    ) -> None:
        self.app = app
        self._sock = bind_socket(host, port)
        self.host, self.port = self._sock.getsockname()[:2]
        self.server = DrainingServer(app, drain_timeout_s, log_level)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True,
            name="parallm-uvicorn",
        )  # fmt: skip

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Graceful shutdown, as on SIGTERM."""
        self.server.should_exit = True
        self._thread.join(timeout_s)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
