"""Attention over the paged KV cache: metadata, the backend interface, the reference backend and
the ``Attention`` layer that models call with their raw (unrotated) q, k and v."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from parallm.kernels.reference import paged_attention_ref, write_kv

if TYPE_CHECKING:
    from parallm.layers.rotary import RopeTables


@dataclass
class AttentionMetadata:
    """Where this step's tokens sit in the paged cache (see docs/INTERFACES.md)."""

    slot_mapping: torch.Tensor  # [T] int64
    query_start_loc: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor  # [B] int32, context length after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32
    max_query_len: int
    max_seq_len: int
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    # Draft trees (speculative decoding), None in any other step: the last tree_num_nodes[b]
    # [B] int32 tokens of sequence b are tree nodes, and tree_visible[T] int64 holds, for each
    # node, the bitmask of its sequence's nodes it attends to (bit j: node j); keys before the
    # nodes stay visible as in any causal step.
    tree_num_nodes: torch.Tensor | None = None
    tree_visible: torch.Tensor | None = None
    # A captured step of any query lengths (engine/mixed_graph.py): the prefill kernel's tile
    # table [2, N] int32 (``paged_prefill.prefill_tiles``), which fixes its grid; None: the
    # grid follows the step's shape.
    prefill_tiles: torch.Tensor | None = None
    # With ``prefill_tiles``, a second table of the step's short queries (at most
    # ``short_query_len`` tokens each; ``paged_prefill.split_prefill_tiles``), attended in a
    # launch of the kernel's smallest row tile; ``prefill_tiles`` then names only the others.
    short_tiles: torch.Tensor | None = None
    short_query_len: int = 0
    # A pure decode step's rows in the order their attention programs start, [B] int32
    # (``paged_decode.longest_first``); None: row order.
    decode_order: torch.Tensor | None = None

    @property
    def is_pure_decode(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(Protocol):
    """One step's attention of one layer over the paged KV cache.

    ``forward`` takes the raw q, k and v of the step's tokens and this pass's rotary tables: it
    rotates q and k, writes k and v into ``kv_cache`` at ``meta.slot_mapping`` and attends over
    each sequence's context (causal within the sequence's new tokens, any number of them).
    Whether rotary and the store run inside its attention kernel is the backend's own choice.
    An fp8 (e4m3) cache holds ``k / k_scale`` and ``v / v_scale``, ``kv_scale = [k_scale,
    v_scale]`` (float32, the layer's): the backend quantizes on the store and dequantizes on
    the read.
    """

    name: str

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        rope: RopeTables,
        kv_scale: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


@dataclass
class ForwardContext:
    """What the attention layers need for one step; the model passes it through untouched."""

    meta: AttentionMetadata
    kv_caches: list[torch.Tensor]
    backend: AttentionBackend


class ReferenceAttention:
    """Plain PyTorch attention, one sequence at a time: the correctness baseline on any device."""

    name = "reference"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        rope: RopeTables,
        kv_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q, k = rope.apply(q, k)
        write_kv(k, v, kv_cache, meta.slot_mapping, kv_scale)
        return paged_attention_ref(
            q, kv_cache[0], kv_cache[1], meta.block_tables, meta.query_start_loc_cpu,
            meta.seq_lens_cpu, scale, kv_scale, meta.tree_num_nodes, meta.tree_visible, q.dtype,
        )  # fmt: skip


def dense_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Training/no-cache path. q: [B, S, Hq, D], k/v: [B, S, Hkv, D] -> [B, S, Hq, D]."""
    group = q.shape[2] // k.shape[2]
    if group > 1:
        k = k.repeat_interleave(group, dim=2)
        v = v.repeat_interleave(group, dim=2)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale
    )
    return out.transpose(1, 2)


class Attention(nn.Module):
    """One layer's attention over raw q ``[..., Hq, D]`` and k, v ``[..., Hkv, D]``: through the
    step's backend and this layer's KV cache when serving, dense and causal per row without a
    context (training, ``[B, S]`` batches)."""

    def __init__(self, layer_idx: int, scale: float) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.scale = scale
        # [k_scale, v_scale] of an fp8 KV cache (float32, unused by a float cache). Fixed at
        # 1.0, vLLM's default without calibrated scales: e4m3 spans +-448 with 3 mantissa bits
        # from 2^-6 up, which covers keys and values of usual magnitudes at 2^-4 relative error.
        # Scales set from the first prefill's amax (vLLM's calculate_kv_scales) would depend on
        # which prompt came first, and a prefix-cached block is read with the scale it was
        # written with, so they would have to be fixed before any block is written anyway. A
        # buffer (not a float) so that kernels and captured graphs read it from the device.
        self.register_buffer("kv_scale", torch.ones(2, dtype=torch.float32), persistent=False)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rope: RopeTables,
        ctx: ForwardContext | None,
    ) -> torch.Tensor:
        if ctx is None:
            q, k = rope.apply(q, k)
            return dense_causal_attention(q, k, v, self.scale)
        kv_cache = ctx.kv_caches[self.layer_idx]
        return ctx.backend.forward(q, k, v, kv_cache, ctx.meta, self.scale, rope, self.kv_scale)
