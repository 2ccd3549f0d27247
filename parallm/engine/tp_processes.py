"""The worker processes a one-host tensor-parallel driver spawns (ranks 1..N-1): their start,
their health, what a dead one said, and their stop. Each has a pipe to the driver that carries
only its start-up message and, if it fails, its traceback; steps go over the process group."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from parallm.engine.tp_worker import spawned_worker_main

_POLL_SECONDS = 0.1


@dataclass(frozen=True)
class WorkerProblem:
    """A spawned worker died, or sent an error or a message out of turn, instead of the one
    the driver waited for. ``detail`` is what it sent (None: nothing)."""

    detail: str | None = None


class SpawnedWorkers:
    """Ranks 1..N-1 as daemon child processes of this one (empty for a torchrun job)."""

    def __init__(self) -> None:
        self.procs: list[BaseProcess] = []
        self.conns: list[Connection] = []

    def start(self, device: str, init_method: str, world_size: int) -> None:
        """Spawn ranks 1..world_size-1; they rendezvous with rank 0 at ``init_method``."""
        ctx = mp.get_context("spawn")
        for rank in range(1, world_size):
            parent, child = ctx.Pipe()
            args = (device, init_method, rank, world_size, child)
            proc = ctx.Process(target=spawned_worker_main, args=args, daemon=True,
                               name=f"parallm-tp-rank{rank}")  # fmt: skip
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)

    def expect(self, rank: int, kind: str) -> WorkerProblem | None:
        """Wait for ``rank``'s message ``kind``: None once it came, else what went wrong."""
        conn, proc = self.conns[rank - 1], self.procs[rank - 1]
        while True:
            if conn.poll(_POLL_SECONDS):
                try:
                    msg = conn.recv()
                except EOFError:
                    return WorkerProblem()
                if msg[0] == "error":
                    return WorkerProblem(msg[1])
                if msg[0] != kind:
                    return WorkerProblem(f"unexpected message {msg[0]!r}")
                return None
            if not proc.is_alive():
                return WorkerProblem()

    def first_dead(self) -> int | None:
        """The lowest rank whose process has exited, None while all run."""
        for rank, proc in enumerate(self.procs, start=1):
            if not proc.is_alive():
                return rank
        return None

    def describe(self, rank: int, detail: str | None) -> tuple[str, str | None]:
        """Who failed and how (``tensor-parallel worker rank r (pid p) <state>``), and
        ``detail`` or else the traceback the worker sent before it exited."""
        proc = self.procs[rank - 1]
        proc.join(_POLL_SECONDS)
        state = "is not responding" if proc.is_alive() else f"exited with code {proc.exitcode}"
        where = f"tensor-parallel worker rank {rank} (pid {proc.pid}) {state}"
        return where, detail or _pending_error(self.conns[rank - 1])

    def stop(self, seconds: float) -> None:
        """Wait up to ``seconds`` in all for the workers to exit, kill the rest, close pipes."""
        deadline = time.monotonic() + seconds
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()


def _pending_error(conn: Connection) -> str | None:
    """The traceback a spawned worker sent before it exited, if any."""
    with contextlib.suppress(OSError, EOFError):
        while conn.poll(0):
            msg = conn.recv()
            if msg[0] == "error":
                return msg[1]
    return None
