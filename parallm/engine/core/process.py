"""The engine-core process: loads the engine, then runs its loop behind two ZeroMQ sockets.

It connects a PULL socket to the API process's command address and a PUSH socket to its output
address (the API process binds both, as ``ipc://`` paths in a private temporary folder). Its
first message is ``Ready`` (or ``StartupFailed`` with the error, after which it exits 1).

It ignores SIGINT and SIGTERM: a Ctrl-C or a signal to the whole process group must let the API
process drain its requests first; the API process stops it with ``Shutdown``. It also exits as
soon as the API process is gone (it watches its parent's sentinel), so it is never orphaned;
its tensor-parallel workers then exit as their pipe to it closes.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import shutil
import signal
import threading
import traceback
from collections.abc import Callable
from typing import Any

import zmq

from parallm.engine.core.loop import EngineCoreLoop, engine_info, run_core_loop
from parallm.engine.core.messages import (
    Command,
    CoreFailed,
    CoreMessage,
    Ready,
    StartupFailed,
    command_decoder,
    encode,
)
from parallm.process_exit import exit_now

logger = logging.getLogger("parallm.engine.core")

# How long the last message (an error) may take to leave when the process exits.
_LAST_MESSAGE_LINGER_MS = 2000


class _ParentGone(Exception):
    """The API process exited: nobody is left to serve."""


def run_engine_core(
    engine_kwargs: dict[str, Any],
    input_address: str,
    output_address: str,
    ipc_dir: str,
    num_threads: int | None = None,
    env: dict[str, str] | None = None,
    engine_factory: Callable[..., Any] | None = None,
) -> None:
    """The engine-core process's entry point (``multiprocessing`` spawn target). ``env`` is
    set before anything runs: a data-parallel replica's ``CUDA_VISIBLE_DEVICES`` (CUDA reads
    it when first used, later than the imports that brought us here); its tensor-parallel
    workers inherit it. ``engine_factory(**engine_kwargs)`` builds the engine instead of
    ``LLM`` (a module-level function: benchmarks stand a fake engine in for the model)."""
    os.environ.update(env or {})
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if num_threads is not None:
        import torch

        torch.set_num_threads(num_threads)
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.connect(input_address)
    outbox = ctx.socket(zmq.PUSH)
    outbox.setsockopt(zmq.SNDHWM, 0)  # never block on a slow reader: the reader is the server
    outbox.connect(output_address)
    try:
        code = _serve(engine_kwargs, inbox, outbox, engine_factory)
    finally:
        inbox.close(linger=0)
        outbox.close(linger=_LAST_MESSAGE_LINGER_MS)
        ctx.term()
        # The API process removes the folder when it stops us; if it died, nobody else will.
        shutil.rmtree(ipc_dir, ignore_errors=True)
    exit_now(code)  # the engine is closed, its last message sent, the folder gone


def _serve(
    engine_kwargs: dict[str, Any],
    inbox: zmq.Socket,
    outbox: zmq.Socket,
    engine_factory: Callable[..., Any] | None = None,
) -> int:
    """Build the engine and run its loop; the process's exit code."""

    def send(message: CoreMessage) -> None:
        outbox.send(encode(message), copy=False)

    loaded = _stop_loading_if_the_parent_dies()
    try:
        if engine_factory is None:
            from parallm.llm import LLM

            engine = LLM(**engine_kwargs).engine
        else:
            engine = engine_factory(**engine_kwargs)
    except BaseException as exc:
        send(StartupFailed(type(exc).__name__, str(exc), traceback.format_exc()))
        return 1
    finally:
        loaded()
    # What is loaded lives as long as the process: later full collections need not walk it
    # (vLLM freezes its engine core's start-up heap too).
    gc.collect()
    gc.freeze()
    try:
        tokenizer = pickle.dumps(engine.tokenizer) if engine.tokenizer is not None else None
        send(Ready(engine_info(engine), tokenizer, os.getpid()))
        receive = _receiver(inbox)
        run_core_loop(EngineCoreLoop(engine), receive, send)
        return 0
    except _ParentGone:
        logger.warning("the API process exited; the engine core stops")
        return 1
    except BaseException as exc:  # a bug in the loop: tell the API process, then exit
        logger.exception("engine core loop died")
        send(CoreFailed(f"the engine core loop died: {exc!r}"))
        return 1
    finally:
        engine.close()


def _stop_loading_if_the_parent_dies() -> Callable[[], None]:
    """Watch the API process while the engine loads (which may take minutes and reads no
    socket): if it dies, interrupt the load with ``_ParentGone``. Returns the call that ends
    the watch; from then on the loop's poll watches the parent."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return lambda: None
    done = threading.Event()
    main_thread = threading.main_thread().ident

    def interrupt(signum: int, frame: Any) -> None:
        raise _ParentGone()

    def watch() -> None:
        while not done.is_set():
            if multiprocessing.connection.wait([parent.sentinel], timeout=0.2):
                if not done.is_set():
                    # To the main thread itself, so that a blocking call there (a read of a
                    # slow file system) fails with EINTR and the handler runs.
                    signal.pthread_kill(main_thread, signal.SIGUSR1)
                return

    def stop_watching() -> None:
        done.set()
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # one sent just now must not land later

    signal.signal(signal.SIGUSR1, interrupt)
    threading.Thread(target=watch, name="parallm-parent-watch", daemon=True).start()
    return stop_watching


def _receiver(inbox: zmq.Socket) -> Callable[[float | None], list[Command]]:
    """``receive(wait_s)`` for ``run_core_loop``: the commands that arrived, waiting up to
    ``wait_s`` seconds for the first; raises ``_ParentGone`` once the API process exited."""
    decoder = command_decoder()
    parent = multiprocessing.parent_process()
    poller = zmq.Poller()
    poller.register(inbox, zmq.POLLIN)
    if parent is not None:
        poller.register(parent.sentinel, zmq.POLLIN)

    def receive(wait_s: float | None) -> list[Command]:
        timeout_ms = None if wait_s is None else int(wait_s * 1000)
        events = dict(poller.poll(timeout_ms))
        if parent is not None and parent.sentinel in events:
            raise _ParentGone()
        commands = []
        while True:
            try:
                data = inbox.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return commands
            commands.append(decoder.decode(data.buffer))

    return receive
