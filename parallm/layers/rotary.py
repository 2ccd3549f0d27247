"""Rotary position embedding (rotate-half form), with Llama 3 frequency scaling."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from parallm.layers.attention import write_kv


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies, adjusted for ``rope_type: llama3`` when given."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    return _llama3_scale(inv_freq, scaling)


def _llama3_scale(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    # Long wavelengths are stretched by `factor`, short ones kept, the band between interpolated.
    factor = s["factor"]
    low, high = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q and k given each token's absolute position."""

    def __init__(
        self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None
    ) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        # Non-persistent: derived from the config, never part of a checkpoint.
        self.register_buffer("cos_cache", emb.cos(), persistent=False)
        self.register_buffer("sin_cache", emb.sin(), persistent=False)
        self.fused = False  # set from outside (engine on CUDA) to use parallm.kernels.elementwise

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k: [..., tokens, heads, head_dim]; positions: [..., tokens]."""
        return self.apply(self.lookup(positions, q.dtype), q, k)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeTables:
        """cos/sin rows of these positions, gathered once per forward for all layers."""
        if self.fused:
            return RopeTables(positions, None, None)
        cos = self.cos_cache[positions].unsqueeze(-2).to(dtype)
        sin = self.sin_cache[positions].unsqueeze(-2).to(dtype)
        return RopeTables(positions, cos, sin)

    def apply(
        self, tables: RopeTables, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fused:
            from parallm.kernels import elementwise

            return elementwise.apply_rotary(q, k, self.cos_cache, self.sin_cache, tables.positions)
        cos, sin = tables.cos, tables.sin
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    def apply_and_store(
        self,
        tables: RopeTables,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        slots: torch.Tensor,
    ) -> torch.Tensor:
        """Rotate q and k, store the rotated k and v at ``slots`` of the paged cache; returns q.

        q: [T, Hq, D]; k, v: [T, Hkv, D]. Fused, one kernel does it all (see
        ``parallm.kernels.rope_store``); otherwise ``apply`` then ``write_kv``.
        """
        if self.fused:
            from parallm.kernels import rope_store

            return rope_store.rotary_and_store_kv(
                q, k, v, self.cos_cache, self.sin_cache, tables.positions, kv_cache, slots
            )
        q, k = self.apply(tables, q, k)
        write_kv(k, v, kv_cache, slots)
        return q


@dataclass
class RopeTables:
    """Positions of a forward pass and, on the PyTorch path, their cos/sin rows."""

    positions: torch.Tensor
    cos: torch.Tensor | None
    sin: torch.Tensor | None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)
