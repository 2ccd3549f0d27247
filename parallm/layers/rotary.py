"""Rotary position embedding (rotate-half form), with Llama 3 frequency scaling."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


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
    """The RoPE cos/sin tables of every position (rotate-half layout)."""

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

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k: [..., tokens, heads, head_dim]; positions: [..., tokens]."""
        return self.lookup(positions).apply(q, k)

    def lookup(self, positions: torch.Tensor) -> RopeTables:
        """The tables for one forward pass, shared by all layers."""
        return RopeTables(positions, self.cos_cache, self.sin_cache)


class RopeTables:
    """A forward pass's positions and the model's cos/sin tables.

    Kernels that rotate inside themselves (the Triton attention backend) read the tables by
    position; :meth:`apply` rotates in PyTorch, gathering the cos/sin rows of the positions on
    first use and sharing them with every later layer of the pass.
    """

    def __init__(
        self, positions: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor
    ) -> None:
        self.positions = positions
        self.cos_cache = cos_cache
        self.sin_cache = sin_cache
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None

    def apply(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated q and k; q, k: [..., tokens, heads, head_dim]."""
        if self._rows is None or self._rows[0].dtype != q.dtype:
            cos = self.cos_cache[self.positions].unsqueeze(-2).to(q.dtype)
            sin = self.sin_cache[self.positions].unsqueeze(-2).to(q.dtype)
            self._rows = (cos, sin)
        cos, sin = self._rows
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)
