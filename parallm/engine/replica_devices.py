"""Which GPUs each data-parallel replica sees: the offline engine's and the server's alike.

On CUDA, replica i sees only GPUs ``[i * tp, (i + 1) * tp)`` of this process's visible ones
(``CUDA_VISIBLE_DEVICES``, as vLLM hands each data-parallel engine its devices), so that inside
it the engine and its tensor-parallel workers use ``cuda:0 .. cuda:tp-1`` as usual. This module
imports no transport (ZeroMQ): offline ``LLM(data_parallel_size=N)`` uses it too.
"""

from __future__ import annotations

import os

import torch

from parallm.config import resolve_device


def replica_environments(
    device: str, data_parallel_size: int, tensor_parallel_size: int
) -> list[dict[str, str]]:
    """Per replica, the environment variables that give it its own GPUs (none on CPU, or
    with one replica, which keeps this process's devices). ValueError, before anything
    starts, when this process sees fewer GPUs than the replicas need."""
    n, tp = data_parallel_size, tensor_parallel_size
    resolved = resolve_device(device)
    if n == 1 or resolved.type != "cuda":
        return [{} for _ in range(n)]
    if resolved.index is not None:
        raise ValueError(
            f"data_parallel_size={n} gives each replica its own GPUs, so device must be 'cuda' "
            f"or 'auto', got device={device!r}"
        )
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        gpus = [str(i) for i in range(torch.cuda.device_count())]
    else:
        gpus = [g.strip() for g in visible.split(",") if g.strip()]
    if len(gpus) < n * tp:
        raise ValueError(
            f"data_parallel_size={n} x tensor_parallel_size={tp} needs {n * tp} GPUs; this "
            f"process sees {len(gpus)} (one GPU per rank of each replica: data_parallel_size x "
            f"tensor_parallel_size must be at most {len(gpus)} here)"
        )
    return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * tp : (i + 1) * tp])} for i in range(n)]
