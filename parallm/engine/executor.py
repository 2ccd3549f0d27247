"""Tensor-parallel execution: one model shard per rank, the scheduler once, in the driver.

Rank 0 is the engine's own process (the driver): it schedules, runs its shard and samples.
Ranks 1..N-1 are workers, each with its shard and the KV cache of its heads. They come from
one of two places:

- one host (the default): the driver spawns them (``spawn``) and they rendezvous with it on a
  localhost port;
- a ``torchrun`` job (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
  ``MASTER_PORT`` in the environment, possibly across hosts): the process with ``RANK=0`` is
  the driver and every other rank runs ``torchrun_worker_main`` (``parallm`` on the command
  line and ``LLM(...)`` call it for them), so the world size must equal
  ``tensor_parallel_size``.

Every eager step the driver broadcasts the step's flat inputs (``StepInputs``: numpy arrays,
no ``Sequence`` objects) to the workers over a gloo control group (``StepChannel``: a fixed
header, then one int64 payload); all ranks then run the same forward, kept in lockstep by the
all-reduces of the row-parallel layers and the embedding and the all-gather of the LM head
over the default group (gloo on the CPU; NCCL on GPUs, rank r on ``cuda:(index + r)``). On
GPUs every rank captures the same decode graphs together, and for a pure decode step the driver
sends the graph step's arrays instead and every rank replays the same graph. Each rank sizes
its KV cache for its own device and all take the fewest blocks. A rank that dies closes
its connections, which fails the waits of the others at once; one that falls silent (its host
vanished) is noticed when a wait times out, and an idle driver sends no-ops (a heartbeat) so
that idle workers never time out.

Workers exit when the driver closes the executor (``LLMEngine.close``, or at interpreter exit)
or when their connection to it fails (the driver died). A worker that dies makes the driver's
next step raise a ``RuntimeError`` that names it, and the remaining workers are stopped. As
with any ``spawn`` start, a script that builds a tensor-parallel engine at import time must
guard it with ``if __name__ == "__main__":``.

This module is the driver's side (``TensorParallelExecutor``); ``tp_worker.py`` is a worker's,
``tp_processes.py`` the spawned worker processes, ``tp_group.py`` the process groups and
``tp_env.py`` the torchrun environment and the checks of a ``tensor_parallel_size``.
"""

from __future__ import annotations

import atexit
import contextlib
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

from parallm.engine.prompt_logprobs import PromptSpan, span_rows
from parallm.engine.step_channel import StepChannel
from parallm.engine.step_inputs import StepInputs
from parallm.engine.tp_env import (
    TorchrunEnv,
    check_cuda_devices,
    check_tensor_parallel,
    check_torchrun_world,
    is_torchrun_worker,
    rank_device,
    torchrun_env,
)
from parallm.engine.tp_group import control_group, join_group, leave_group
from parallm.engine.tp_processes import SpawnedWorkers
from parallm.engine.tp_worker import WorkerSpec, torchrun_worker_main

# Where the other modules and the tests have always found these names.
__all__ = [
    "TensorParallelExecutor", "TorchrunEnv", "WorkerSpec", "check_cuda_devices",
    "check_tensor_parallel", "check_torchrun_world", "close_open_executors",
    "is_torchrun_worker", "rank_device", "torchrun_env", "torchrun_worker_main",
]  # fmt: skip

# The driver sends a no-op when it has sent nothing on the control group for
# _HEARTBEAT_SECONDS, well within the control group's timeout (tp_group.py), so idle workers
# keep waiting and a rank that is gone without closing its connections is noticed.
_HEARTBEAT_SECONDS = 30.0
_POLL_SECONDS = 0.1
_STOP_SECONDS = 10.0


T = TypeVar("T")

# Executors not closed yet: ``close_open_executors`` ends them before interpreter exit.
_OPEN: weakref.WeakSet[TensorParallelExecutor] = weakref.WeakSet()


def close_open_executors() -> None:
    """Close every tensor-parallel executor of this process (their workers and group)."""
    for executor in list(_OPEN):
        executor.close()


class TensorParallelExecutor:
    """Joins the default process group as rank 0 (this process) with ranks 1..N-1: spawned
    here, or the other ranks of this process's torchrun job."""

    def __init__(self, spec: WorkerSpec) -> None:
        if dist.is_initialized():
            raise ValueError(
                "tensor_parallel_size > 1: this process already has a torch.distributed "
                "group (another tensor-parallel engine still open?); close it first"
            )
        self.tp_size = spec.tp_size
        self.torchrun = torchrun_env()
        self.failure: str | None = None
        self._closed = False
        self.workers = SpawnedWorkers()
        # The spawned ranks' rendezvous folder (none under torchrun); it goes at close.
        self._rendezvous: tempfile.TemporaryDirectory | None = None
        self.channel: StepChannel | None = None
        # Sends on the control group, the engine's and the heartbeat's, one at a time.
        self._send_lock = threading.Lock()
        self._last_send = time.monotonic()
        self._stopping = threading.Event()
        self._heartbeat_error: BaseException | None = None
        self._heartbeat: threading.Thread | None = None
        atexit.register(self.close)
        _OPEN.add(self)
        try:
            if self.torchrun is None:
                self._spawn_workers(spec)
            else:
                check_torchrun_world(spec.tp_size)
                if self.torchrun.rank != 0:
                    raise ValueError("only the torchrun job's rank 0 builds the engine")
                join_group(rank_device(spec.device, 0), "env://", 0, spec.tp_size)
            self.channel = StepChannel(control_group())
            self.channel.send_spec(spec)
            self._heartbeat = threading.Thread(target=self._keep_alive, daemon=True,
                                               name="parallm-tp-heartbeat")  # fmt: skip
            self._heartbeat.start()
        except BaseException:
            self.close()
            raise

    def _keep_alive(self) -> None:
        """Send a no-op whenever the control group has been quiet for a heartbeat period."""
        while not self._stopping.wait(_HEARTBEAT_SECONDS / 4):
            with self._send_lock:
                quiet = time.monotonic() - self._last_send >= _HEARTBEAT_SECONDS
                if self._stopping.is_set() or not quiet:
                    continue
                try:
                    self.channel.send_command(StepChannel.NOOP)
                except RuntimeError as e:  # the engine's next step reports it
                    self._heartbeat_error = e
                    return
                self._last_send = time.monotonic()

    def _spawn_workers(self, spec: WorkerSpec) -> None:
        # A file, not a TCP port: a port picked free here could be taken by another process
        # before rank 0 listens on it.
        self._rendezvous = tempfile.TemporaryDirectory(prefix="parallm-tp-")
        init_method = f"file://{self._rendezvous.name}/store"
        self.workers.start(spec.device, init_method, spec.tp_size)
        for rank in range(1, spec.tp_size):
            problem = self.workers.expect(rank, "joining")
            if problem is not None:
                self._fail(rank, "while starting", problem.detail)
        join_group(rank_device(spec.device, 0), init_method, 0, spec.tp_size)

    def plan_num_blocks(self, plan: Callable[[], int]) -> int:
        """The KV blocks every rank has room for: each rank plans its own (``plan`` is rank
        0's, ``ModelRunner.plan_num_blocks``; on CUDA its profiling forward runs alongside
        the workers', collectives included) and the fewest wins. Raises, naming the rank,
        when a worker could not load its shard."""

        def plan_everywhere(channel: StepChannel) -> tuple[list[str | None], int]:
            errors = channel.plan()
            if any(error is not None for error in errors):
                return errors, 0
            # The lock is held through rank 0's plan: a heartbeat sent now would meet the
            # workers' all-reduce instead of their next command.
            return errors, channel.min_blocks(self._on_rank_0(plan, "plan its KV cache"))

        errors, num_blocks = self._control(plan_everywhere)
        for rank, error in enumerate(errors):
            if error is not None:
                self._fail(rank, "while loading its shard", error)
        return num_blocks

    def capture_graphs(self, capture: Callable[[], float]) -> float:
        """Every rank captures its decode graphs (``spec.graph_sizes``) together: their
        warm-up forwards and captures hold the same collectives in the same order. ``capture``
        is rank 0's (``ModelRunner.capture_cuda_graphs``); returns what it returns. Raises,
        naming the rank, when a worker could not capture."""

        def capture_everywhere(channel: StepChannel) -> tuple[float, list[str | None]]:
            # The lock is held through rank 0's capture: a heartbeat sent now would meet the
            # workers' error report instead of their next command.
            channel.send_command(StepChannel.CAPTURE)
            seconds = self._on_rank_0(capture, "capture its CUDA graphs")
            return seconds, channel.gather_errors(None)

        seconds, errors = self._control(capture_everywhere)
        for rank, error in enumerate(errors):
            if error is not None:
                self._fail(rank, "while capturing its CUDA graphs", error)
        return seconds

    def _on_rank_0(self, work: Callable[[], T], what: str) -> T:
        """Rank 0's share of work the workers do alongside it (collectives included): if it
        fails, the workers may wait in those collectives, so the engine stops for good."""
        try:
            return work()
        except BaseException as e:
            self.abandon(f"rank 0 could not {what} ({type(e).__name__}: {e})")
            raise

    def send_graph_step(self, *arrays) -> None:
        """Hand one graph-replayed decode step to every worker
        (``ModelRunner.graph_step_listener``: ``DecodeGraphs.run``'s arrays)."""
        self.check_workers()
        self._control(lambda ch: ch.send_graph_step(arrays))

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Each worker allocates its heads' cache; returns once every shard is loaded and ready."""
        errors = self._control(lambda channel: channel.allocate(num_blocks))
        for rank, error in enumerate(errors):
            if error is not None:
                self._fail(rank, "while loading its shard", error)

    def send_step(self, inputs: StepInputs, spans: list[PromptSpan]) -> None:
        """Hand one step to every worker (``ModelRunner.step_listener``)."""
        self.check_workers()
        rows = span_rows(spans) if spans else None
        self._control(lambda ch: ch.send_step(inputs, rows))

    def check_workers(self) -> None:
        """RuntimeError, and every worker stopped, if a worker has died or the executor failed."""
        if self.failure is not None:
            raise RuntimeError(self.failure)
        dead = self.workers.first_dead()
        if dead is not None:
            self._fail(dead, "")

    def explain(self, error: BaseException) -> None:
        """Raise the worker failure behind ``error`` (a failed collective), if there is one."""
        if self.failure is not None:  # already explained (a failed send of this step)
            raise RuntimeError(self.failure) from error
        if self.torchrun is not None:
            self._lost(error)
        deadline = time.monotonic() + 2.0  # a killed peer's exit may not be reaped yet
        while time.monotonic() < deadline:
            self.check_workers()
            time.sleep(_POLL_SECONDS)

    def abandon(self, reason: str) -> None:
        """Stop for good after a step the driver did not finish: the workers may be inside
        its collectives, so the ranks are out of step and no later step could pair up."""
        if self.failure is None:
            self.failure = f"tensor-parallel engine stopped: {reason}; build a new one"
        self.close()

    def close(self) -> None:
        """Stop the workers and leave the process group; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        _OPEN.discard(self)
        self._stopping.set()
        # A failed or abandoned engine's workers may be inside a step's collectives and never
        # take the command (a broadcast waits for every receiver): they learn it from the
        # group's teardown instead.
        if self.channel is not None and self.failure is None:
            with self._send_lock, contextlib.suppress(RuntimeError):  # a dead peer fails it
                self.channel.send_command(StepChannel.CLOSE)
        # Leaving the group fails any collective a worker still waits in (a step the driver
        # abandoned), so that it exits instead of waiting for the timeout.
        if dist.is_initialized():
            leave_group(aborting=self.failure is not None)
        self.workers.stop(_STOP_SECONDS)
        if self._rendezvous is not None:
            self._rendezvous.cleanup()

    def _control(self, send):
        """Run ``send(channel)``; a failed send is a lost rank, reported as such."""
        if self.failure is not None:
            raise RuntimeError(self.failure)
        if self._heartbeat_error is not None:
            self._lost(self._heartbeat_error)
        try:
            with self._send_lock:
                result = send(self.channel)
                self._last_send = time.monotonic()
                return result
        except RuntimeError as e:
            self.explain(e)
            self._lost(e)

    def _lost(self, error: BaseException) -> None:
        """A torchrun job's peer is gone (only its connection tells): stop and raise."""
        self.failure = (
            "tensor-parallel engine stopped: a rank of the job died or lost its connection "
            f"({type(error).__name__}: {error}); see that rank's log, then restart the job"
        )
        self.close()
        raise RuntimeError(self.failure) from error

    def _fail(self, rank: int, when: str, detail: str | None = None) -> None:
        if self.torchrun is not None:
            where = f"tensor-parallel rank {rank}"
        else:
            where, detail = self.workers.describe(rank, detail)
        message = (
            f"{where}{' failed' if self.torchrun is not None else ''}"
            f"{' ' + when if when else ''}; the engine cannot continue and has stopped its "
            "other workers (build a new one)"
        )
        if detail:
            message += f"\n--- rank {rank} ---\n{detail}"
        self.failure = message
        self.close()
        raise RuntimeError(message)
