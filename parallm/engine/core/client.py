"""The API process's end of one engine-core process.

``EngineCoreClient(engine_kwargs)`` spawns the core, waits for it to load the engine, and then
offers what the server's ``AsyncEngine`` needs: ``send(command)``, outputs through a callback
on a receiver thread, ``stop()``, and ``engine``, a view of the engine's limits, tokenizer and
prompt checks. Each client owns its process, sockets and folder, so a server may hold several
(one per core).

Death of the core at any time (a crash, a kill) is reported once through ``on_death`` with its
exit code; ``failure`` keeps the message. ``stop()`` (also run at interpreter exit) shuts the
core down, kills it if it does not exit in time, and removes the socket folder.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing as mp
import pickle
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from parallm.engine.core.messages import (
    Command,
    CoreFailed,
    CoreOutputs,
    EngineInfo,
    Ready,
    Shutdown,
    StartupFailed,
    core_message_decoder,
    encode,
)
from parallm.engine.core.process import run_engine_core
from parallm.engine.engine import LLMEngine

logger = logging.getLogger("parallm.engine.core")

_STOP_TIMEOUT_S = 10.0


class EngineCoreError(RuntimeError):
    """The engine core failed to start or died."""


@dataclass
class _ModelShape:
    vocab_size: int


@dataclass
class _ConfigView:
    model: str | None


class EngineView:
    """What the API process reads of the engine it serves: the limits, the tokenizer, and
    the same prompt and parameter checks as ``LLMEngine``'s (run on these attributes), so
    that bad input is refused before it is sent."""

    def __init__(self, info: EngineInfo, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = info.max_model_len
        self.model_config = _ModelShape(info.vocab_size)
        self.config = _ConfigView(info.model)

    validate_prompt = LLMEngine.validate_prompt
    validate_params = LLMEngine.validate_params


class EngineCoreClient:
    """Spawns one engine-core process for ``LLM(**engine_kwargs)`` and talks to it.

    Returns once the engine is loaded; raises ``ValueError`` for the core's bad-argument
    errors (as the in-process engine would) and ``EngineCoreError`` for any other start-up
    failure, with the core's message. ``num_threads`` sets the core's torch intra-op threads.
    ``engine_factory`` (a module-level function, called in the core as
    ``engine_factory(**engine_kwargs)``) builds the engine instead of ``LLM``.
    """

    def __init__(
        self,
        engine_kwargs: dict[str, Any],
        num_threads: int | None = None,
        replica: int | None = None,
        env: dict[str, str] | None = None,
        wait: bool = True,
        engine_factory: Callable[..., Any] | None = None,
    ) -> None:
        self.replica = replica
        self.failure: str | None = None
        self._closing = False
        self._closed = False
        self._send_lock = threading.Lock()
        self._receiver: threading.Thread | None = None
        self._dir = tempfile.mkdtemp(prefix="parallm-core-")
        self._zmq = zmq.Context()
        self._commands = self._zmq.socket(zmq.PUSH)
        self._commands.setsockopt(zmq.SNDHWM, 0)  # a submit never blocks on the core
        self._commands.bind(f"ipc://{self._dir}/commands")
        self._outputs = self._zmq.socket(zmq.PULL)
        self._outputs.bind(f"ipc://{self._dir}/outputs")
        self._decoder = core_message_decoder()
        suffix = "" if replica is None else f"-dp{replica}"
        self.process = mp.get_context("spawn").Process(
            target=run_engine_core,
            args=(engine_kwargs, f"ipc://{self._dir}/commands", f"ipc://{self._dir}/outputs",
                  self._dir, num_threads, env, engine_factory),
            name=f"parallm-engine-core{suffix}",
        )  # fmt: skip
        atexit.register(self.stop)
        try:
            self.process.start()
        except BaseException:
            self.stop(timeout_s=0)
            raise
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Wait for the core to load its engine (its start-up error is raised here, and the
        core stopped). The constructor calls it unless given ``wait=False``."""
        try:
            ready = self._wait_ready()
        except BaseException:
            self.stop(timeout_s=0)  # a core still loading reads no Shutdown
            raise
        self.info = ready.info
        tokenizer = pickle.loads(ready.tokenizer) if ready.tokenizer is not None else None
        self.engine = EngineView(ready.info, tokenizer)

    def named(self, message: str) -> str:
        """``message`` with the data-parallel replica it concerns, when there are several."""
        return (
            message if self.replica is None else f"data-parallel replica {self.replica}: {message}"
        )

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def is_alive(self) -> bool:
        return self.failure is None and self.process.is_alive()

    def start(
        self, on_outputs: Callable[[CoreOutputs], None], on_death: Callable[[str], None]
    ) -> None:
        """Start delivering the core's outputs to ``on_outputs`` (on a receiver thread)."""
        if self._receiver is None:
            self._receiver = threading.Thread(
                target=self._receive, args=(on_outputs, on_death),
                name="parallm-engine-core-outputs", daemon=True,
            )  # fmt: skip
            self._receiver.start()

    def send(self, command: Command) -> None:
        """Queue a command for the core; dropped once the core is gone (its death fails
        every request anyway)."""
        data = encode(command)
        with self._send_lock:
            if self._closed:
                return
            with contextlib.suppress(zmq.Again):  # no peer: the core has exited
                self._commands.send(data, zmq.NOBLOCK, copy=False)

    def stop(self, timeout_s: float = _STOP_TIMEOUT_S) -> None:
        """Shut the core down (killed after ``timeout_s``), then release the sockets and the
        folder. Safe to call more than once."""
        if self._closing:
            return
        self._closing = True
        atexit.unregister(self.stop)
        # The receiver thread reaps the core when it exits: waiting for that thread, not for
        # the process, keeps a second waitpid from racing it (the loser finds no child, and
        # multiprocessing then reports a core that has exited as alive).
        reaper = self._receiver if self._receiver is not None else self.process
        if self.process.is_alive():
            self.send(Shutdown())
            reaper.join(timeout_s)
            if reaper.is_alive():
                logger.warning("the engine core did not stop in %.0fs; killing it", timeout_s)
                self.process.kill()
                self.process.join()
        if self._receiver is not None:
            self._receiver.join(timeout_s)
        with self._send_lock:
            self._closed = True
            self._commands.close(linger=0)
        self._outputs.close(linger=0)
        self._zmq.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _wait_ready(self) -> Ready:
        """The core's first message; its error if it failed or died while loading."""
        poller = zmq.Poller()
        poller.register(self._outputs, zmq.POLLIN)
        poller.register(self.process.sentinel, zmq.POLLIN)
        while True:
            events = dict(poller.poll())
            if self._outputs in events:
                message = self._decoder.decode(self._outputs.recv())
                if isinstance(message, Ready):
                    return message
                if isinstance(message, StartupFailed):
                    self.process.join(_STOP_TIMEOUT_S)  # it exits right after saying so
                    raise _startup_error(message, self.named)
                raise EngineCoreError(
                    self.named(f"unexpected first message {type(message).__name__}")
                )
            if self.process.sentinel in events:
                self.process.join()
                raise EngineCoreError(self.named(
                    f"the engine core process exited with code {self.process.exitcode} "
                    "while loading the engine"
                ))  # fmt: skip

    def _receive(
        self, on_outputs: Callable[[CoreOutputs], None], on_death: Callable[[str], None]
    ) -> None:
        """The receiver thread: hand each output batch over until the core exits."""
        poller = zmq.Poller()
        poller.register(self._outputs, zmq.POLLIN)
        poller.register(self.process.sentinel, zmq.POLLIN)
        last_words: str | None = None
        try:
            while True:
                events = dict(poller.poll())
                last_words = self._deliver_pending(on_outputs) or last_words
                if self.process.sentinel in events:
                    # Outputs sent just before the exit are queued already: deliver them.
                    last_words = self._deliver_pending(on_outputs) or last_words
                    break
        except BaseException as exc:  # a bug in output handling: the server cannot go on
            logger.exception("delivering the engine core's outputs failed")
            last_words = f"delivering the engine core's outputs failed: {exc!r}"
            self.process.kill()
        self.process.join()
        if self._closing and last_words is None:
            return  # stopped on purpose
        self.failure = self.named(last_words or (
            f"the engine core process (pid {self.process.pid}) died unexpectedly with exit "
            f"code {self.process.exitcode}"
        ))  # fmt: skip
        logger.error("%s", self.failure)
        on_death(self.failure)

    def _deliver_pending(self, on_outputs: Callable[[CoreOutputs], None]) -> str | None:
        """Deliver every message waiting; the core's last words if it reported its death."""
        last_words = None
        while True:
            try:
                data = self._outputs.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return last_words
            message = self._decoder.decode(data.buffer)
            if isinstance(message, CoreOutputs):
                on_outputs(message)
            elif isinstance(message, CoreFailed):
                last_words = message.message


def _startup_error(message: StartupFailed, named: Callable[[str], str]) -> Exception:
    """The core's start-up error in this process: a bad argument stays a ValueError (the CLI
    reports it as usage error); anything else carries the core's traceback. ``named`` adds
    the replica's name."""
    if message.error_type == "ValueError":
        return ValueError(message.message)
    return EngineCoreError(named(
        f"the engine core failed to start: {message.error_type}: {message.message}\n"
        f"--- engine core traceback ---\n{message.traceback}"
    ))  # fmt: skip
