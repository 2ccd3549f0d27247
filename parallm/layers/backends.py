"""Attention backend selection, and the Triton backend for CUDA."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from parallm.layers.attention import AttentionBackend, AttentionMetadata, ReferenceAttention

if TYPE_CHECKING:
    from parallm.layers.rotary import RopeTables

BACKENDS = ("auto", "reference", "triton")


class TritonAttention:
    """Paged attention in Triton. A pure decode step is one kernel per layer (rotary, KV store
    and split-K attention); any other step rotates and stores in one kernel, then attends with
    the prefill kernel (any number of new tokens per sequence, draft trees included)."""

    name = "triton"

    def __init__(self) -> None:
        from parallm.kernels import paged_decode, paged_prefill, rope_store  # triton here

        self.decode = paged_decode
        self.prefill = paged_prefill
        self.rope_store = rope_store
        # The split merge's arrival counters, shared by all layers and steps (every call
        # leaves them at zero). Allocated by the first decode call, which the warm-up before a
        # CUDA-graph capture makes, so captured graphs read this one buffer.
        self._split_counters: torch.Tensor | None = None

    def split_counters(self, device: torch.device) -> torch.Tensor:
        if self._split_counters is None:
            self._split_counters = self.decode.new_split_counters(device)
        return self._split_counters

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
        tables = (rope.cos_cache, rope.sin_cache, rope.positions)
        if meta.is_pure_decode:
            new_token = self.rope_store.NewTokenRope(k, v, *tables, meta.slot_mapping)
            return self.decode.paged_decode_attention(
                q, kv_cache[0], kv_cache[1], meta.block_tables, meta.seq_lens, scale,
                meta.max_seq_len, rope=new_token, split_counters=self.split_counters(q.device),
                kv_scale=kv_scale, row_order=meta.decode_order,
            )  # fmt: skip
        q = self.rope_store.rotary_and_store_kv(q, k, v, *tables, kv_cache, meta.slot_mapping,
                                                kv_scale=kv_scale)  # fmt: skip
        paged = (kv_cache[0], kv_cache[1], meta.block_tables, meta.query_start_loc, meta.seq_lens)
        out = self.prefill.paged_prefill_attention(
            q, *paged, meta.max_query_len, scale, kv_scale=kv_scale,
            tree_num_nodes=meta.tree_num_nodes, tree_visible=meta.tree_visible,
            tiles=meta.prefill_tiles,
        )  # fmt: skip
        if meta.short_tiles is not None:  # the short queries' rows of the same output
            self.prefill.paged_prefill_attention(
                q, *paged, meta.short_query_len, scale, out=out, kv_scale=kv_scale,
                tree_num_nodes=meta.tree_num_nodes, tree_visible=meta.tree_visible,
                tiles=meta.short_tiles,
            )  # fmt: skip
        return out


def check_kv_cache_dtype_support(
    backend: AttentionBackend, kv_cache_dtype: torch.dtype, device: torch.device
) -> None:
    """ValueError, before the model loads, for an fp8 KV cache that the backend's kernels
    cannot convert on this GPU: Triton's e4m3 (fp8e4nv) needs compute capability 8.9 (Ada,
    Hopper) or newer."""
    if kv_cache_dtype != torch.float8_e4m3fn or backend.name != "triton":
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        raise ValueError(
            f"kv_cache_dtype='fp8' with the Triton attention backend needs compute capability "
            f">= 8.9 (Ada, Hopper) for e4m3; this GPU has {capability[0]}.{capability[1]}: use "
            "kv_cache_dtype='auto' or attention_backend='reference'"
        )


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
