"""Attention backend selection, and the Triton backend for CUDA."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from parallm.layers.attention import (
    AttentionBackend,
    AttentionMetadata,
    ReferenceAttention,
    write_kv,
)

if TYPE_CHECKING:  # importing it pulls in triton
    from parallm.kernels.rope_store import NewTokenRope

BACKENDS = ("auto", "reference", "triton")
# Decode steps rotate q/k and store k/v inside the decode attention kernel (one launch fewer
# per layer); PARALLM_ROPE_IN_DECODE=0 restores the separate rotary+store kernel for A/B runs.
ROPE_IN_DECODE = os.environ.get("PARALLM_ROPE_IN_DECODE", "1") != "0"
# (cos_cache, sin_cache, positions) of a forward pass.
RotaryTables = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class TritonAttention:
    """Paged attention kernels written in Triton: one prefill kernel, one split-K decode kernel."""

    name = "triton"
    # Every kernel of a one-row decode step through this backend is Triton and PDL-aware, so
    # the step's kernels may chain with programmatic dependent launch (parallm.kernels.pdl).
    pdl_safe = True

    def __init__(self) -> None:
        from parallm.kernels import paged_attention

        self.kernels = paged_attention

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        write_kv(k, v, kv_cache, meta.slot_mapping)
        return self.attend(q, kv_cache, meta, scale)

    def attend(
        self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """Attention alone, over a cache that already holds this step's k/v (written by the
        caller, e.g. with ``parallm.kernels.rope_store``)."""
        if meta.is_pure_decode:
            return self._decode(q, kv_cache, meta, scale)
        return self.kernels.paged_prefill_attention(
            q, kv_cache[0], kv_cache[1], meta.block_tables, meta.query_start_loc, meta.seq_lens,
            meta.max_query_len, scale,
        )  # fmt: skip

    def rope_store_attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        rotary: RotaryTables,
    ) -> torch.Tensor | None:
        """A pure decode step's attention with the rotary and the KV store inside the decode
        kernel (raw q, k, v in); None when the step is not pure decode (the caller then
        rotates and stores first)."""
        if not (meta.is_pure_decode and ROPE_IN_DECODE):
            return None
        rope = self.kernels.NewTokenRope(k, v, *rotary, meta.slot_mapping)
        return self._decode(q, kv_cache, meta, scale, rope)

    def _decode(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        rope: NewTokenRope | None = None,
    ) -> torch.Tensor:
        return self.kernels.paged_decode_attention(
            q, kv_cache[0], kv_cache[1], meta.block_tables, meta.seq_lens, scale,
            meta.max_seq_len, rope=rope,
        )  # fmt: skip


def select_backend(name: str, device: torch.device) -> AttentionBackend:
    """``auto``: Triton on CUDA, the reference path elsewhere."""
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {list(BACKENDS)}, got {name!r}")
    if name == "auto":
        name = "triton" if device.type == "cuda" else "reference"
    if name == "triton":
        if device.type != "cuda":
            raise ValueError("attention_backend='triton' needs device='cuda'")
        return TritonAttention()
    return ReferenceAttention()
