"""Linear layers: the one place where tensor-parallel shards and quantized variants plug in.

Each layer is an ``nn.Linear`` (weight ``[out, in]``) that knows which part of a checkpoint
tensor it holds: its parameters carry ``weight_loader(param, loaded, shard_id)``, which copies
this rank's slice of a full checkpoint tensor. Column-parallel layers split output features
across ``tp_size`` ranks, row-parallel ones input features. Packed layers (q/k/v in one GEMM,
gate/up in one GEMM) load each of their checkpoint tensors into its own rows (``shard_id``).
A quantized variant replaces one of these modules by swap and keeps its loader.

With ``tp_size > 1`` a rank holds only its shard and computes its share: the model that
calls these layers joins the row-parallel partial sums (one all-reduce after attention and one
after the MLP, ``parallm/models/llama.py``).
"""

from __future__ import annotations

import torch
from torch import nn


def _check_divides(what: str, total: int, parts: int) -> None:
    if total % parts:
        raise ValueError(f"{what} ({total}) must be divisible by tp_size ({parts})")


def _check_shape(loaded: torch.Tensor, want: tuple[int, ...], what: str) -> None:
    if tuple(loaded.shape) != want:
        raise ValueError(f"{what}: checkpoint shape {tuple(loaded.shape)}, expected {want}")


class ColumnParallelLinear(nn.Linear):
    """``y = x W^T + b`` with W's output rows split across ranks (rank r holds block r)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        _check_divides("out_features", out_features, tp_size)
        super().__init__(in_features, out_features // tp_size, bias=bias)
        self.full_out_features = out_features
        self.tp_rank, self.tp_size = tp_rank, tp_size
        for param in self.parameters():
            param.weight_loader = self.weight_loader

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None
    ) -> None:
        rows = param.shape[0]
        _check_shape(loaded, (self.full_out_features, *param.shape[1:]), "column-parallel")
        param.copy_(loaded.narrow(0, self.tp_rank * rows, rows))


class RowParallelLinear(nn.Linear):
    """``y = x W^T + b`` with W's input columns split across ranks; each rank's partial sums
    add up to ``y``. The bias belongs to the sum once: rank 0 holds it, the others zeros."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        _check_divides("in_features", in_features, tp_size)
        super().__init__(in_features // tp_size, out_features, bias=bias)
        self.full_in_features = in_features
        self.tp_rank, self.tp_size = tp_rank, tp_size
        for param in self.parameters():
            param.weight_loader = self.weight_loader

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None
    ) -> None:
        if param.dim() == 1:  # the bias, or a quantized layer's per-row scales: whole rows
            _check_shape(loaded, tuple(param.shape), "row-parallel bias")
            keep = self.tp_rank == 0 or param is not self.bias
            param.copy_(loaded if keep else torch.zeros_like(loaded))
            return
        cols = param.shape[1]
        _check_shape(loaded, (param.shape[0], self.full_in_features), "row-parallel")
        param.copy_(loaded.narrow(1, self.tp_rank * cols, cols))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one GEMM (gate and up): checkpoint tensor ``i``
    (``shard_id=i``) fills rows ``sum(sizes[:i]) .. `` of each rank's weight."""

    def __init__(
        self,
        in_features: int,
        output_sizes: list[int],
        bias: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        for size in output_sizes:
            _check_divides("each output size", size, tp_size)
        self.output_sizes = [size // tp_size for size in output_sizes]
        super().__init__(in_features, sum(output_sizes), bias, tp_rank, tp_size)
        self.shard_ids = tuple(range(len(output_sizes)))

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None
    ) -> None:
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"shard_id must be one of {list(self.shard_ids)}, got {shard_id!r}")
        size = self.output_sizes[shard_id]
        offset = sum(self.output_sizes[:shard_id])
        _check_shape(loaded, (size * self.tp_size, *param.shape[1:]), f"shard {shard_id}")
        param.narrow(0, offset, size).copy_(loaded.narrow(0, self.tp_rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one GEMM, split across ranks by heads. With fewer KV heads
    than ranks, each KV head is replicated on ``tp_size / num_kv_heads`` ranks."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        _check_divides("num_attention_heads", num_heads, tp_size)
        if num_kv_heads >= tp_size:
            _check_divides("num_key_value_heads", num_kv_heads, tp_size)
        elif tp_size % num_kv_heads:
            raise ValueError(
                f"tp_size ({tp_size}) must be a multiple of num_key_value_heads ({num_kv_heads})"
            )
        self.head_dim = head_dim
        self.num_heads = num_heads // tp_size  # per rank
        self.num_kv_heads = max(1, num_kv_heads // tp_size)
        self.kv_replicas = max(1, tp_size // num_kv_heads)
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        out_per_rank = self.q_size + 2 * self.kv_size
        super().__init__(hidden_size, out_per_rank * tp_size, bias, tp_rank, tp_size)
        self.full_sizes = {"q": num_heads * head_dim, "k": num_kv_heads * head_dim,
                           "v": num_kv_heads * head_dim}  # fmt: skip
        self.shard_ids = ("q", "k", "v")

    @property
    def output_sizes(self) -> list[int]:
        """Per-rank widths of q, k and v, in the order of the packed output."""
        return [self.q_size, self.kv_size, self.kv_size]

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None
    ) -> None:
        if shard_id not in self.full_sizes:
            raise ValueError(f"shard_id must be one of {list(self.shard_ids)}, got {shard_id!r}")
        _check_shape(loaded, (self.full_sizes[shard_id], *param.shape[1:]), f"{shard_id}_proj")
        if shard_id == "q":
            offset, size, part = 0, self.q_size, self.tp_rank
        else:
            offset = self.q_size + (self.kv_size if shard_id == "v" else 0)
            size, part = self.kv_size, self.tp_rank // self.kv_replicas
        param.narrow(0, offset, size).copy_(loaded.narrow(0, part * size, size))


def packed_shard_ids(module: nn.Module) -> tuple[str | int, ...] | None:
    """The checkpoint tensors a packed layer is loaded from, or None for a plain one."""
    return getattr(module, "shard_ids", None)
