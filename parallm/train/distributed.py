"""Process group and device mesh for training, under torchrun or as a single plain process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class DistInfo:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # whether we created the default process group (and so destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _device(preference: str, local_rank: int) -> torch.device:
    use_cuda = preference == "cuda" or (preference == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("training.device is 'cuda' but no CUDA device is available")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def init_distributed(device_preference: str = "auto") -> DistInfo:
    """Join the job torchrun describes in the environment, or make a one-process group.

    A single process still gets a process group (an in-memory store, no port) so that the same
    FSDP / DTensor / DCP code path runs for one device and for many.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = _device(device_preference, local_rank)
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, False)
    backend = "nccl" if device.type == "cuda" else "gloo"
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1 and "MASTER_ADDR" not in os.environ:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    else:
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, **kwargs)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, True)


def build_mesh(device: torch.device, dp: int, tp: int) -> DeviceMesh:
    """A 2-D mesh: data parallel ("dp", outer) by tensor parallel ("tp", inner, adjacent ranks)."""
    return init_device_mesh(device.type, (dp, tp), mesh_dim_names=("dp", "tp"))


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean over all ranks (tensor-parallel peers hold equal values, so this is the DP mean)."""
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def barrier(device: torch.device) -> None:
    """A barrier that also works before any NCCL communicator is warmed up."""
    if device.type == "cuda":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()
