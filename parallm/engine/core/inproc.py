"""The engine core loop on a thread of the API process (the server's opt-out of the separate
engine-core process): the same loop and messages, handed over in memory."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from parallm.engine.core.loop import EngineCoreLoop, engine_info, run_core_loop
from parallm.engine.core.messages import Command, CoreOutputs, Shutdown
from parallm.engine.engine import LLMEngine

logger = logging.getLogger("parallm.engine.core")


class InProcessCore:
    """Runs ``EngineCoreLoop`` over ``engine`` on one thread; nothing else touches the engine's
    mutable state while it runs. ``on_outputs`` is called on that thread."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.info = engine_info(engine)
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(
        self, on_outputs: Callable[[CoreOutputs], None], on_death: Callable[[str], None]
    ) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, args=(on_outputs, on_death), name="parallm-engine", daemon=True
            )
            self._thread.start()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def send(self, command: Command) -> None:
        self._inbox.put(command)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._inbox.put(Shutdown())
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(
        self, on_outputs: Callable[[CoreOutputs], None], on_death: Callable[[str], None]
    ) -> None:
        try:
            run_core_loop(EngineCoreLoop(self.engine), self._receive, on_outputs)
        except BaseException as exc:  # a bug in the loop: say so everywhere, then stop
            logger.exception("engine loop died")
            on_death(f"the engine loop died: {exc!r}")

    def _receive(self, wait_s: float | None) -> list[Command]:
        try:
            first = self._inbox.get_nowait() if wait_s == 0 else self._inbox.get(timeout=wait_s)
        except queue.Empty:
            return []
        commands = [first]
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                return commands
