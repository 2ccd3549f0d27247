"""A tensor-parallel worker (rank 1..N-1): join the job's groups, build this rank's shard
from the driver's ``WorkerSpec``, then run the driver's commands (steps, graph steps, KV
planning and allocation, graph capture) until it closes the job.

A worker is spawned by the driver (``spawned_worker_main``) or is another rank of a torchrun
job (``torchrun_worker_main``). It ignores SIGINT and SIGTERM (the driver decides when workers
stop) and exits when the driver closes it or when its connection to the driver fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch

from parallm.config import CacheConfig, ModelConfig, resolve_device
from parallm.engine.runner import ModelRunner
from parallm.engine.step_channel import StepChannel
from parallm.engine.tp_env import check_torchrun_world, rank_device, torchrun_env
from parallm.engine.tp_group import control_group, join_group, leave_group


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


def _ignore_stop_signals() -> None:
    # The driver decides when workers stop (a Ctrl-C or a SIGTERM to the whole process group
    # must let it drain first); they also exit when their connection to it fails.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def spawned_worker_main(
    device: str, init_method: str, rank: int, world_size: int, conn: Connection
) -> None:
    """A spawned worker's life: join the group, then serve the driver (``_serve``)."""
    _ignore_stop_signals()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        conn.send(("joining",))
        join_group(rank_device(device, rank), init_method, rank, world_size)
        _serve(rank, rank)
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
        os._exit(1)  # skip the process group's teardown, which would wait for the others
    leave_group(aborting=False)  # destroys this rank's captured graphs first


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
        join_group(rank_device(resolve_device(device), env.local_rank), "env://", env.rank,
                   env.world_size)  # fmt: skip
        _serve(env.rank, env.local_rank)
    except BaseException:
        traceback.print_exc()
        print(f"parallm: tensor-parallel rank {env.rank} failed; exiting", file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)  # skip the process group's teardown, which would wait for the others
    leave_group(aborting=False)  # destroys this rank's captured graphs first
    return 0


def _serve(rank: int, local_rank: int) -> None:
    """Build this rank's shard from the driver's spec, then run its commands until CLOSE."""
    channel = StepChannel(control_group())
    _Worker(channel, channel.recv_spec(), rank, local_rank).serve()


class _Worker:
    """One rank's runner and the driver's commands to it. A failure to build or allocate is
    reported to the driver (which names this rank) and raised; a failure inside a step is
    raised (the driver's collectives then fail)."""

    def __init__(self, channel: StepChannel, spec: WorkerSpec, rank: int, local_rank: int):
        self.channel, self.spec, self.rank = channel, spec, rank
        self.runner: ModelRunner | None = None
        # The traceback of a failed build or allocation, reported at the next PLAN/ALLOCATE.
        self.error: str | None = None
        try:
            self.runner = _build_runner(spec, rank, local_rank)
        except Exception:
            self.error = traceback.format_exc()

    def serve(self) -> None:
        """Run the driver's commands until CLOSE (NOOP: the driver's heartbeat)."""
        while True:
            command, argument, inputs, rows = self.channel.recv()
            if command == StepChannel.STEP:
                self.runner.execute_forward(inputs, rows)
            elif command == StepChannel.GRAPH_STEP:
                with torch.inference_mode():
                    self.runner.graphs.run(*inputs)
            elif command == StepChannel.CAPTURE:
                self._capture()
            elif command == StepChannel.PLAN:
                self._plan()
            elif command == StepChannel.ALLOCATE:
                self._allocate(argument)
            elif command == StepChannel.CLOSE:
                return

    def _capture(self) -> None:
        failure = None
        try:
            self.runner.capture_cuda_graphs(list(self.spec.graph_sizes), self.spec.max_model_len)
        except Exception:
            failure = traceback.format_exc()
        self.channel.gather_errors(failure)
        if failure is not None:
            raise RuntimeError(f"rank {self.rank} could not capture its CUDA graphs:\n{failure}")

    def _plan(self) -> None:
        if any(e is not None for e in self.channel.share_errors(self.error)):
            self._raise_load_error()
            return  # another rank failed: the driver stops the job
        spec = self.spec
        self.channel.min_blocks(self.runner.plan_num_blocks(
            spec.max_num_batched_tokens, spec.max_num_seqs, spec.max_model_len
        ))  # fmt: skip

    def _allocate(self, num_blocks: int) -> None:
        if self.error is None:
            try:
                self.runner.allocate_kv_cache(num_blocks)
            except Exception:
                self.error = traceback.format_exc()
        self.channel.gather_errors(self.error)
        self._raise_load_error()

    def _raise_load_error(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"rank {self.rank} could not load its shard:\n{self.error}")


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
