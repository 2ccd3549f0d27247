"""AdamW, the learning-rate schedule and global gradient-norm clipping over DTensor gradients."""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from parallm.train.config import OptimSection


def build_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (and embeddings) only, not on norms or biases."""
    decay, no_decay = [], []
    for param in model.parameters():  # shared (tied) parameters appear once
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused CUDA kernel updates every tensor in one pass (foreach takes several). The CPU
    # keeps foreach, which the 1-rank vs N-rank equality tests were written against.
    fused = all(p.device.type == "cuda" for p in decay + no_decay)
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None
    )


def lr_at(step: int, cfg: OptimSection, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then cosine decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / decay_steps, 1.0)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _replicas(grad: torch.Tensor, world_size: int) -> int:
    """How many ranks hold a copy of each element of this rank's local gradient."""
    if not isinstance(grad, DTensor):
        return world_size
    mesh, shards = grad.device_mesh, 1
    for dim, placement in enumerate(grad.placements):
        if isinstance(placement, Shard):  # _StridedShard is a Shard too
            shards *= mesh.size(dim)
    return world_size // shards


def _local(grad: torch.Tensor) -> torch.Tensor:
    # to_local() is a view of the DTensor's storage, so in-place scaling reaches the gradient.
    return grad.to_local() if isinstance(grad, DTensor) else grad


@torch.no_grad()
def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale gradients so their global L2 norm is at most ``max_norm``; return the norm.

    Parameters may live on different meshes (FSDP-only norms on "dp", TP+FSDP matrices on
    "dp" x "tp"), which ``torch.nn.utils.clip_grad_norm_`` cannot mix. So each rank sums the
    squares of its local shards, divides by the number of ranks that hold the same shard,
    and one all-reduce gives the exact global sum.
    """
    grads = [p.grad for p in params if p.grad is not None]
    world_size = dist.get_world_size()
    by_replicas: dict[int, list[torch.Tensor]] = defaultdict(list)
    for grad in grads:
        by_replicas[_replicas(grad, world_size)].append(_local(grad))
    device = grads[0].device if grads else torch.device("cpu")
    squares = torch.zeros((), dtype=torch.float32, device=device)
    for replicas, tensors in by_replicas.items():
        norms = torch.stack(torch._foreach_norm(tensors)).float()
        squares += norms.pow(2).sum() / replicas
    dist.all_reduce(squares)
    total = squares.sqrt()
    if max_norm > 0:
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for tensors in by_replicas.values():
            torch._foreach_mul_(tensors, scale)
    return total
