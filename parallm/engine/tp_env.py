"""A tensor-parallel job's ranks: where this process stands in a torchrun job, which device
each rank runs on, and the checks that a ``tensor_parallel_size`` can run here, made before
anything loads."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from parallm.config import EngineConfig, ModelConfig

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


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
