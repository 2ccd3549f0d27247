"""Tensor-parallel execution: one model shard per rank, the scheduler once, in the driver.

Rank 0 is the engine's own process (the driver): it schedules, runs its shard and samples.
Ranks 1..N-1 are worker processes (``spawn``), each with its shard and the KV cache of its
heads. Every eager step the driver sends the step's flat inputs (``StepInputs``: numpy arrays,
plain data, no ``Sequence`` objects) to each worker over a ``multiprocessing`` pipe; all ranks
then run the same forward, kept in lockstep by the all-reduces of the row-parallel layers and
the embedding and the all-gather of the LM head (``torch.distributed``, gloo). The pipe is the
first transport; ZeroMQ with msgspec replaces it when the engine core moves to its own process.

Workers exit when the driver closes the executor (``LLMEngine.close``, or at interpreter exit)
or when the driver's end of their pipe closes (the driver died). A worker that dies makes the
driver's next step raise a ``RuntimeError`` that names it, and the remaining workers are
stopped. As with any ``spawn`` start, a script that builds a tensor-parallel engine at import
time must guard it with ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing as mp
import os
import signal
import socket
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import torch
import torch.distributed as dist

from parallm.config import CacheConfig, EngineConfig, ModelConfig
from parallm.engine.prompt_logprobs import PromptSpan, span_rows
from parallm.engine.runner import ModelRunner, StepInputs

# How long a collective waits for a rank that is alive but late (a slow CPU step). A rank that
# dies closes its connections, which fails the collective at once instead.
_COLLECTIVE_TIMEOUT = timedelta(minutes=10)
_POLL_SECONDS = 0.1
_STOP_SECONDS = 10.0


def check_tensor_parallel(config: EngineConfig, model: ModelConfig, device: torch.device) -> None:
    """ValueError, before anything loads, for a ``tensor_parallel_size`` this model or this
    engine cannot run: heads or MLP width that do not split evenly, a device other than the
    CPU, and the features not combined with tensor parallelism yet."""
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
    if device.type != "cpu":
        raise ValueError(
            f"tensor_parallel_size > 1 runs on device='cpu' (gloo) only so far, got "
            f"device={device.type!r}: NCCL, CUDA graphs over the collectives and async "
            "scheduling are not implemented yet"
        )
    if config.async_scheduling:
        raise ValueError(
            "async_scheduling=True cannot be combined with tensor_parallel_size > 1 yet"
        )
    if config.speculative_config is not None:
        raise ValueError("speculative_config cannot be combined with tensor_parallel_size > 1 yet")


@dataclass
class WorkerSpec:
    """What a worker needs to build its shard and runner (picklable)."""

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
    init_method: str = ""


class TensorParallelExecutor:
    """Starts ranks 1..N-1 and joins the default process group as rank 0 (this process)."""

    def __init__(self, spec: WorkerSpec) -> None:
        if dist.is_initialized():
            raise ValueError(
                "tensor_parallel_size > 1: this process already has a torch.distributed "
                "group (another tensor-parallel engine still open?); close it first"
            )
        spec.init_method = f"tcp://127.0.0.1:{_free_port()}"
        self.tp_size = spec.tp_size
        self.failure: str | None = None
        self._closed = False
        ctx = mp.get_context("spawn")
        self.workers: list[BaseProcess] = []
        self.conns: list[Connection] = []
        atexit.register(self.close)
        for rank in range(1, spec.tp_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(spec, rank, child), daemon=True,
                               name=f"parallm-tp-rank{rank}")  # fmt: skip
            proc.start()
            child.close()
            self.workers.append(proc)
            self.conns.append(parent)
        try:
            for rank in range(1, spec.tp_size):
                self._expect(rank, "joining", "while starting")
            dist.init_process_group(
                "gloo", init_method=spec.init_method, rank=0, world_size=spec.tp_size,
                timeout=_COLLECTIVE_TIMEOUT,
            )  # fmt: skip
        except BaseException:
            self.close()
            raise

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Each worker allocates its heads' cache; returns once every shard is loaded and ready."""
        for conn in self.conns:
            conn.send(("allocate", num_blocks))
        for rank in range(1, self.tp_size):
            self._expect(rank, "ready", "while loading its shard")

    def send_step(self, inputs: StepInputs, spans: list[PromptSpan]) -> None:
        """Hand one step to every worker (``ModelRunner.step_listener``)."""
        self.check_workers()
        rows = span_rows(spans) if spans else None
        for rank, conn in enumerate(self.conns, start=1):
            try:
                conn.send(("step", inputs, rows))
            except OSError:
                self._fail(rank, "while receiving a step")

    def check_workers(self) -> None:
        """RuntimeError, and every worker stopped, if a worker has died or the executor failed."""
        if self.failure is not None:
            raise RuntimeError(self.failure)
        for rank, proc in enumerate(self.workers, start=1):
            if not proc.is_alive():
                self._fail(rank, "")

    def explain(self, error: BaseException) -> None:
        """Raise the worker failure behind ``error`` (a failed collective), if there is one."""
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
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(("close",))
        # Leaving the group first fails any collective a worker still waits in (a step the
        # driver abandoned), so that it exits instead of waiting for the timeout.
        if dist.is_initialized():
            dist.destroy_process_group()
        deadline = time.monotonic() + _STOP_SECONDS
        for proc in self.workers:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()

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
        proc = self.workers[rank - 1]
        proc.join(_POLL_SECONDS)
        state = "is not responding" if proc.is_alive() else f"exited with code {proc.exitcode}"
        message = (
            f"tensor-parallel worker rank {rank} (pid {proc.pid}) {state}"
            f"{' ' + when if when else ''}; the engine cannot continue and has stopped its "
            "other workers (build a new one)"
        )
        if detail:
            message += f"\n--- rank {rank} ---\n{detail}"
        self.failure = message
        self.close()
        raise RuntimeError(message)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(spec: WorkerSpec, rank: int, conn: Connection) -> None:
    """A worker's life: join the group, build the shard, then run the driver's steps."""
    # The driver decides when workers stop (a Ctrl-C or a SIGTERM to the whole process group
    # must let it drain first); they also exit when its end of the pipe closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.tp_size))
    try:
        conn.send(("joining",))
        dist.init_process_group(
            "gloo", init_method=spec.init_method, rank=rank, world_size=spec.tp_size,
            timeout=_COLLECTIVE_TIMEOUT,
        )  # fmt: skip
        runner = _build_runner(spec, rank)
        while True:
            msg = conn.recv()
            if msg[0] == "step":
                runner.execute_forward(msg[1], msg[2])
            elif msg[0] == "allocate":
                runner.allocate_kv_cache(msg[1])
                conn.send(("ready",))
            elif msg[0] == "close":
                break
    except EOFError:
        pass  # the driver is gone
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
        os._exit(1)  # skip the process group's teardown, which would wait for the others
    if dist.is_initialized():
        dist.destroy_process_group()


def _build_runner(spec: WorkerSpec, rank: int) -> ModelRunner:
    from parallm.layers.backends import select_backend
    from parallm.layers.quantization import quantize_model
    from parallm.models.loader import load_model

    device = torch.device(spec.device)
    model = load_model(
        spec.model_dir, spec.model_config, spec.dtype, device, spec.max_positions,
        load_format=spec.load_format, seed=spec.seed, packed=True, tp_rank=rank,
        tp_size=spec.tp_size,
    )  # fmt: skip
    if spec.quantization is not None:
        quantize_model(model, spec.quantization)
    backend = select_backend(spec.attention_backend, device)
    return ModelRunner(model, spec.model_config, spec.cache_config, device, spec.dtype, backend,
                       tp_size=spec.tp_size)  # fmt: skip
