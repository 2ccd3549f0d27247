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
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import TypeVar

import torch
import torch.distributed as dist

from parallm.config import CacheConfig, EngineConfig, ModelConfig, resolve_device
from parallm.engine.prompt_logprobs import PromptSpan, span_rows
from parallm.engine.runner import ModelRunner, StepInputs
from parallm.engine.step_channel import StepChannel

# How long a collective inside a step waits for a rank that is alive but late (a slow CPU
# step). A rank that dies closes its connections, which fails the collective at once instead.
_COLLECTIVE_TIMEOUT = timedelta(minutes=10)
# The control group's waits (a worker for the next command, the driver for a worker to take
# one or to load its shard). The driver sends a no-op when it has sent nothing for
# _HEARTBEAT_SECONDS, so idle workers keep waiting, and a rank that is gone without closing
# its connections (its host vanished) is noticed within the timeout.
_CONTROL_TIMEOUT = timedelta(minutes=30)
_HEARTBEAT_SECONDS = 30.0
_POLL_SECONDS = 0.1
_STOP_SECONDS = 10.0
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


T = TypeVar("T")

# Executors not closed yet: ``close_open_executors`` ends them before interpreter exit.
_OPEN: weakref.WeakSet[TensorParallelExecutor] = weakref.WeakSet()


def close_open_executors() -> None:
    """Close every tensor-parallel executor of this process (their workers and group)."""
    for executor in list(_OPEN):
        executor.close()


@dataclass(frozen=True)
class TorchrunEnv:
    """This process's place in a job that torchrun (or an equivalent launcher) describes."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def torchrun_env() -> TorchrunEnv | None:
    """The torchrun-compatible environment of this process, None when it has none."""
    if not all(name in os.environ for name in _TORCHRUN_VARS):
        return None
    world_size = int(os.environ["WORLD_SIZE"])
    return TorchrunEnv(
        rank=int(os.environ["RANK"]), world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world_size)),
    )  # fmt: skip


def is_torchrun_worker(tensor_parallel_size: int) -> bool:
    """Whether this process is rank 1..N-1 of a tensor-parallel torchrun job: it serves the
    driver's steps (``torchrun_worker_main``) instead of building an engine."""
    env = torchrun_env()
    return tensor_parallel_size > 1 and env is not None and env.rank != 0


def check_torchrun_world(tensor_parallel_size: int) -> None:
    """ValueError when a torchrun job's world size is not ``tensor_parallel_size``."""
    env = torchrun_env()
    if tensor_parallel_size > 1 and env is not None and env.world_size != tensor_parallel_size:
        raise ValueError(
            f"tensor_parallel_size ({tensor_parallel_size}) must equal the torchrun job's "
            f"WORLD_SIZE ({env.world_size}, rank {env.rank}): launch nnodes x nproc-per-node "
            "= tensor_parallel_size processes, one per rank"
        )


def check_tensor_parallel(config: EngineConfig, model: ModelConfig, device: torch.device) -> None:
    """ValueError, before anything loads, for a ``tensor_parallel_size`` this model or this
    engine cannot run: heads or MLP width that do not split evenly, a torchrun job of another
    size, too few GPUs on this host, a device other than the CPU or CUDA, and the features not
    combined with tensor parallelism yet."""
    tp = config.tensor_parallel_size
    if tp == 1:
        return
    heads, kv_heads = model.num_attention_heads, model.num_key_value_heads
    if heads % tp:
        raise ValueError(f"tensor_parallel_size ({tp}) must divide num_attention_heads ({heads})")
    if (kv_heads >= tp and kv_heads % tp) or (kv_heads < tp and tp % kv_heads):
        raise ValueError(
            f"tensor_parallel_size ({tp}) must divide num_key_value_heads ({kv_heads}) or be "
            "a multiple of it (KV heads are then replicated)"
        )
    if model.intermediate_size % tp:
        raise ValueError(
            f"tensor_parallel_size ({tp}) must divide intermediate_size ({model.intermediate_size})"
        )
    check_torchrun_world(tp)
    if device.type == "cuda":
        check_cuda_devices(tp, device)
    elif device.type != "cpu":
        raise ValueError(
            f"tensor_parallel_size > 1 runs on device='cpu' (gloo) or 'cuda' (NCCL), got "
            f"device={device.type!r}"
        )
    if config.async_scheduling:
        raise ValueError(
            "async_scheduling=True cannot be combined with tensor_parallel_size > 1 yet"
        )
    if config.speculative_config is not None:
        raise ValueError("speculative_config cannot be combined with tensor_parallel_size > 1 yet")


def check_cuda_devices(tp: int, device: torch.device) -> None:
    """ValueError when this host has too few GPUs for its ranks: rank r (local rank r of a
    torchrun job) runs on ``cuda:(device index + r)``."""
    env = torchrun_env()
    local_ranks = env.local_world_size if env is not None else tp
    first = device.index or 0
    count = torch.cuda.device_count()
    if first + local_ranks > count:
        where = f"device={str(device)!r}: GPUs {first}..{first + local_ranks - 1}"
        raise ValueError(
            f"tensor_parallel_size ({tp}) needs {local_ranks} GPUs on this host ({where}, one "
            f"per rank), but it has {count}; lower tensor_parallel_size or pick another device"
        )


def rank_device(device: str | torch.device, local_rank: int) -> torch.device:
    """Where a rank runs: ``cuda:(index + local_rank)`` on GPUs (index 0 when the engine's
    device names none), the engine's device otherwise."""
    device = torch.device(device)
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + local_rank)


@dataclass
class WorkerSpec:
    """What a worker needs to build its shard and runner (picklable; the driver broadcasts it)."""

    model_dir: str | None
    model_config: ModelConfig
    cache_config: CacheConfig
    dtype: torch.dtype
    device: str
    max_positions: int
    load_format: str
    seed: int
    quantization: str | None
    attention_backend: str
    tp_size: int
    # Rank 0's settings that a worker's runner must share: the Triton norm and activation
    # layers (the replicated hidden state is then normalised alike on every rank), and the
    # step shape that memory planning profiles (its forward's collectives pair up across ranks).
    fused_kernels: bool = False
    max_num_batched_tokens: int = 0
    max_num_seqs: int = 0
    max_model_len: int = 0
    # The decode graphs' batch sizes; every rank captures the same ones (empty: eager).
    graph_sizes: tuple[int, ...] = ()


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
        self.workers: list[BaseProcess] = []
        self.conns: list[Connection] = []
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
                _join(rank_device(spec.device, 0), "env://", 0, spec.tp_size)
            self.channel = StepChannel(_control_group())
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
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        ctx = mp.get_context("spawn")
        for rank in range(1, spec.tp_size):
            parent, child = ctx.Pipe()
            args = (spec.device, init_method, rank, spec.tp_size, child)
            proc = ctx.Process(target=_worker_main, args=args, daemon=True,
                               name=f"parallm-tp-rank{rank}")  # fmt: skip
            proc.start()
            child.close()
            self.workers.append(proc)
            self.conns.append(parent)
        for rank in range(1, spec.tp_size):
            self._expect(rank, "joining", "while starting")
        _join(rank_device(spec.device, 0), init_method, 0, spec.tp_size)

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
        for rank, proc in enumerate(self.workers, start=1):
            if not proc.is_alive():
                self._fail(rank, "")

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
            _leave_group(aborting=self.failure is not None)
        deadline = time.monotonic() + _STOP_SECONDS
        for proc in self.workers:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()

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

    def _expect(self, rank: int, kind: str, when: str) -> None:
        conn, proc = self.conns[rank - 1], self.workers[rank - 1]
        while True:
            if conn.poll(_POLL_SECONDS):
                try:
                    msg = conn.recv()
                except EOFError:
                    self._fail(rank, when)
                if msg[0] == "error":
                    self._fail(rank, when, msg[1])
                if msg[0] != kind:
                    self._fail(rank, when, f"unexpected message {msg[0]!r}")
                return
            if not proc.is_alive():
                self._fail(rank, when)

    def _fail(self, rank: int, when: str, detail: str | None = None) -> None:
        if self.torchrun is not None:
            where = f"tensor-parallel rank {rank}"
        else:
            proc = self.workers[rank - 1]
            proc.join(_POLL_SECONDS)
            state = "is not responding" if proc.is_alive() else f"exited with code {proc.exitcode}"
            where = f"tensor-parallel worker rank {rank} (pid {proc.pid}) {state}"
            detail = detail or _pending_error(self.conns[rank - 1])
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


def _pending_error(conn: Connection) -> str | None:
    """The traceback a spawned worker sent before it exited, if any."""
    with contextlib.suppress(OSError, EOFError):
        while conn.poll(0):
            msg = conn.recv()
            if msg[0] == "error":
                return msg[1]
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# NVLink multicast (NVLS) stays off: the lent multi-GPU machines do not support it, and NCCL or
# symmetric memory would fail at start-up trying it. A value the user set is kept.
_NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def _join(device: torch.device, init_method: str, rank: int, world_size: int) -> None:
    """Join the default group, whose collectives run inside each step's forward: gloo on
    the CPU, NCCL on GPUs (``device`` is this rank's own GPU, made current first so that
    NCCL binds to it)."""
    backend = "gloo"
    if device.type == "cuda":
        backend = "nccl"
        for name, value in _NCCL_ENV.items():
            os.environ.setdefault(name, value)
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world_size,
        timeout=_COLLECTIVE_TIMEOUT,
    )  # fmt: skip


def _leave_group(aborting: bool) -> None:
    """Leave the default group (and the control group). A failed engine's NCCL group may hold
    a collective that a dead rank never joins, which a destroy would wait for: it is aborted."""
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if aborting and abort is not None and dist.get_backend() == "nccl":
        abort()
    else:
        dist.destroy_process_group()


def _control_group() -> dist.ProcessGroup:
    """A gloo group over every rank for the driver's commands (collective: every rank calls)."""
    return dist.new_group(backend="gloo", timeout=_CONTROL_TIMEOUT)


def _ignore_stop_signals() -> None:
    # The driver decides when workers stop (a Ctrl-C or a SIGTERM to the whole process group
    # must let it drain first); they also exit when their connection to it fails.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _worker_main(
    device: str, init_method: str, rank: int, world_size: int, conn: Connection
) -> None:
    """A spawned worker's life: join the group, then serve the driver (``_serve``)."""
    _ignore_stop_signals()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        conn.send(("joining",))
        _join(rank_device(device, rank), init_method, rank, world_size)
        _serve(rank, rank)
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
        os._exit(1)  # skip the process group's teardown, which would wait for the others
    dist.destroy_process_group()


def torchrun_worker_main(tensor_parallel_size: int, device: str = "auto") -> int:
    """Rank 1..N-1 of a torchrun job: join rank 0's engine, serve its steps until it closes
    (exit code 0) or fails (1: its connection broke, or this rank failed, traceback on
    stderr). ``device`` is the engine's setting, as rank 0 has it (it picks the backend).
    ValueError when the job's size is not ``tensor_parallel_size``."""
    check_torchrun_world(tensor_parallel_size)
    env = torchrun_env()
    if env is None or env.rank == 0:
        raise ValueError("torchrun_worker_main runs on ranks 1..N-1 of a torchrun job")
    _ignore_stop_signals()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_world_size))
    try:
        _join(rank_device(resolve_device(device), env.local_rank), "env://", env.rank,
              env.world_size)  # fmt: skip
        _serve(env.rank, env.local_rank)
    except BaseException:
        traceback.print_exc()
        print(f"parallm: tensor-parallel rank {env.rank} failed; exiting", file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)  # skip the process group's teardown, which would wait for the others
    dist.destroy_process_group()
    return 0


def _serve(rank: int, local_rank: int) -> None:
    """Build this rank's shard from the driver's spec, then run its commands until CLOSE.
    A failure to build or allocate is reported to the driver (which names this rank) and
    raised; a failure inside a step is raised (the driver's collectives then fail)."""
    channel = StepChannel(_control_group())
    spec = channel.recv_spec()
    runner, error = None, None
    try:
        runner = _build_runner(spec, rank, local_rank)
    except Exception:
        error = traceback.format_exc()
    while True:
        command, argument, inputs, rows = channel.recv()
        if command == StepChannel.STEP:
            runner.execute_forward(inputs, rows)
        elif command == StepChannel.GRAPH_STEP:
            with torch.inference_mode():
                runner.graphs.run(*inputs)
        elif command == StepChannel.CAPTURE:
            failure = None
            try:
                runner.capture_cuda_graphs(list(spec.graph_sizes), spec.max_model_len)
            except Exception:
                failure = traceback.format_exc()
            channel.gather_errors(failure)
            if failure is not None:
                raise RuntimeError(f"rank {rank} could not capture its CUDA graphs:\n{failure}")
        elif command == StepChannel.PLAN:
            if any(e is not None for e in channel.share_errors(error)):
                if error is not None:
                    raise RuntimeError(f"rank {rank} could not load its shard:\n{error}")
                continue  # another rank failed: the driver stops the job
            channel.min_blocks(runner.plan_num_blocks(
                spec.max_num_batched_tokens, spec.max_num_seqs, spec.max_model_len
            ))  # fmt: skip
        elif command == StepChannel.ALLOCATE:
            if error is None:
                try:
                    runner.allocate_kv_cache(argument)
                except Exception:
                    error = traceback.format_exc()
            channel.gather_errors(error)
            if error is not None:
                raise RuntimeError(f"rank {rank} could not load its shard:\n{error}")
        elif command == StepChannel.CLOSE:
            return
        # NOOP: the driver's heartbeat


def _build_runner(spec: WorkerSpec, rank: int, local_rank: int) -> ModelRunner:
    from parallm.layers.backends import select_backend
    from parallm.layers.quantization import quantize_model
    from parallm.models.loader import load_model

    device = rank_device(spec.device, local_rank)
    model = load_model(
        spec.model_dir, spec.model_config, spec.dtype, device, spec.max_positions,
        load_format=spec.load_format, seed=spec.seed, packed=True, tp_rank=rank,
        tp_size=spec.tp_size,
    )  # fmt: skip
    if spec.quantization is not None:
        quantize_model(model, spec.quantization)
    if spec.fused_kernels:
        from parallm.layers.triton_layers import use_triton_layers  # imports triton

        use_triton_layers(model)
    backend = select_backend(spec.attention_backend, device)
    return ModelRunner(model, spec.model_config, spec.cache_config, device, spec.dtype, backend,
                       fused_kernels=spec.fused_kernels, tp_size=spec.tp_size)  # fmt: skip
