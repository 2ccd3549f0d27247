"""Triton GEMV / skinny GEMM for decode: ``y[M, N] = x[M, K] @ W[N, K]^T (+ bias)``, M <= 16.

At decode batch sizes a linear layer is a stream over W: every weight byte is read once and
used M times, so the kernel is judged by how close it gets to memory bandwidth. Each program
streams [BLOCK_N, BLOCK_K] tiles of W along its slice of K with wide, unmasked loads (edge rows
are clamped rather than masked) and accumulates in float32, either

* on the tensor cores (``use_dot``): ``tl.dot(W_tile, x_tile^T)``, W as the left operand so
  BLOCK_N fills the MMA's M side and the padded batch (16) its N side; the loop is software
  pipelined (``num_stages``), which keeps several tiles in flight per program; or
* with FMAs (batch 1 by default): a [BLOCK_N, BLOCK_M, BLOCK_K] float32 accumulator reduced
  over K once after the loop (when it fits the register budget), so the inner loop is pure
  loads and FMAs without cross-thread shuffles; otherwise reduced over K every step.

Layers with few N tiles (o_proj, down_proj, qkv) cannot fill 132 SMs, so K is split over
``split_k`` programs per tile. Partial sums go to a [split, M, N] float32 workspace and a
second tiny kernel adds them up in a fixed order, adds the bias and casts: the result is
bitwise reproducible run to run (fp32 atomics would not be). Nothing syncs with the host or
depends on data, so a call can be captured in a CUDA graph (compile before capturing).
Configurations come from ``skinny_config`` (a heuristic, not ``triton.autotune``, which would
benchmark during graph capture); ``candidate_configs`` lists the alternatives to sweep.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_M = 16  # larger batches go to F.linear (cuBLAS is compute-efficient there)
_DOT_BLOCK_M = 16  # tl.dot needs every dimension >= 16: the batch is padded to 16
_DEFER_REGS = 64  # float32 registers per thread the FMA path's deferred accumulator may take
_REDUCE_BLOCK = 512


@dataclass(frozen=True)
class SkinnyConfig:
    """Launch parameters of the skinny GEMM (block sizes are powers of two)."""

    block_n: int
    block_k: int
    split_k: int = 1
    use_dot: bool = True
    num_warps: int = 4
    num_stages: int = 3


def skinny_config(
    m: int,
    n: int,
    k: int,
    num_sms: int = 132,
    *,
    programs_per_sm: int = 4,
    use_dot: bool | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> SkinnyConfig:
    """The heuristic: FMAs on 32 x 256 tiles at M = 1, the tensor cores on 64 x 128 tiles for
    M >= 2 (16 KiB of bf16 W per step either way), then split K until ``programs_per_sm``
    programs per SM exist. Keyword overrides let a benchmark sweep the alternatives."""
    if use_dot is None:
        use_dot = m > 1
    block_m = _DOT_BLOCK_M if use_dot else triton.next_power_of_2(m)
    # FMA path: at batch 1-2 the deferred accumulator takes at most _DEFER_REGS registers per
    # thread; wider batches reduce every step, and the [BLOCK_N, BLOCK_M, BLOCK_K] product is
    # held to twice that (more spills, and compiles for tens of seconds).
    budget = _DEFER_REGS * 32 * num_warps * (1 if block_m <= 2 else 2)
    if block_k is None:
        block_k = 128 if use_dot else min(256, budget // (16 * block_m))
    if block_n is None:
        block_n = 64 if use_dot else max(16, min(64, budget // (block_m * block_k)))
    # Small problems (tests) get no bigger tiles than they need.
    block_k = min(block_k, max(16, triton.next_power_of_2(k)))
    block_n = min(block_n, max(16, triton.next_power_of_2(n)))
    n_tiles, k_iters = triton.cdiv(n, block_n), triton.cdiv(k, block_k)
    want = min(k_iters, max(1, triton.cdiv(programs_per_sm * num_sms, n_tiles)))
    # Prefer a divisor of the K steps: equal splits, no masked tail. Otherwise take `want`.
    split = max(d for d in range(1, want + 1) if k_iters % d == 0)
    if 2 * split <= want:
        split = want
    return SkinnyConfig(block_n, block_k, split, use_dot, num_warps, num_stages)


def candidate_configs(m: int, n: int, k: int, num_sms: int = 132) -> dict[str, SkinnyConfig]:
    """The heuristic's choice and alternatives to it (duplicates dropped), for sweeps."""
    base = skinny_config(m, n, k, num_sms)
    # Twice the tile; on the FMA path that also switches to reducing every step.
    wide = {"block_n": 2 * base.block_n}
    options = {
        "heuristic": base,
        "2/SM": skinny_config(m, n, k, num_sms, programs_per_sm=2),
        "8/SM": skinny_config(m, n, k, num_sms, programs_per_sm=8),
        "fma" if base.use_dot else "dot": skinny_config(m, n, k, num_sms, use_dot=not base.use_dot),
        "2x tile": skinny_config(m, n, k, num_sms, **wide),
        "8 warps": replace(base, num_warps=8),
    }
    seen: dict[SkinnyConfig, str] = {}
    return {name: c for name, c in options.items() if seen.setdefault(c, name) == name}


@triton.jit(do_not_specialize=["M"])
def _skinny_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, ws_ptr, M, N, K, stride_xm, stride_wn, k_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, DEFER: tl.constexpr, EVEN_K: tl.constexpr,
    USE_WS: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = pid_k * k_per_split + tl.arange(0, BLOCK_K)
    # Out-of-range rows of W and x re-read the last valid row: loads need no row mask (they
    # stay full-width vectors) and the store drops those rows.
    rows_n = tl.minimum(offs_n, N - 1).to(tl.int64)
    rows_m = tl.minimum(offs_m, M - 1)
    w_ptrs = w_ptr + rows_n[:, None] * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + rows_m[:, None] * stride_xm + offs_k[None, :]
    if USE_DOT:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    elif DEFER:
        acc = tl.zeros([BLOCK_N, BLOCK_M, BLOCK_K], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k in range(0, k_per_split, BLOCK_K):
        if EVEN_K:  # every split is whole BLOCK_K steps inside K: no K mask either
            w = tl.load(w_ptrs)
            x = tl.load(x_ptrs)
        else:
            k_mask = offs_k + k < K
            w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
        if USE_DOT:
            acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)
        elif DEFER:
            acc += w.to(tl.float32)[:, None, :] * x.to(tl.float32)[None, :, :]
        else:
            acc += tl.sum(w.to(tl.float32)[:, None, :] * x.to(tl.float32)[None, :, :], axis=2)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if DEFER and not USE_DOT:
        acc = tl.sum(acc, axis=2)
    # acc is y^T for this tile: acc[i, j] = y[offs_m[j], offs_n[i]].
    mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
    if not USE_WS:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
        out_ptrs = out_ptr + offs_m[None, :] * N + offs_n[:, None]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        ws_ptrs = ws_ptr + (pid_k * M + offs_m[None, :]) * N + offs_n[:, None]
        tl.store(ws_ptrs, acc, mask=mask)


@triton.jit
def _splitk_reduce_kernel(
    ws_ptr, bias_ptr, out_ptr, N, MN, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.load(ws_ptr + offs, mask=mask, other=0.0)
    # Fixed order over the splits: bitwise reproducible.
    for s in tl.static_range(1, SPLIT):
        acc += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: pretend H100, so CPU tests see the GPU's choices
    return torch.cuda.get_device_properties(device).multi_processor_count


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: SkinnyConfig | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for at most ``MAX_M`` rows of x (leading dims flattened),
    accumulated in float32 and returned in x's dtype; more rows fall back to ``F.linear``.

    ``weight`` is [N, K] with unit stride along K; ``config`` defaults to ``skinny_config``.
    """
    *lead, k = x.shape
    n = weight.shape[0]
    if weight.dim() != 2 or weight.shape[1] != k or weight.dtype != x.dtype:
        raise ValueError(f"weight {tuple(weight.shape)} {weight.dtype} does not fit x {x.shape}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias of shape {tuple(bias.shape)}, expected ({n},)")
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m > MAX_M or m == 0 or k == 0:
        return F.linear(x, weight, bias)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    cfg = config or skinny_config(m, n, k, _num_sms(x.device))
    block_m = _DOT_BLOCK_M if cfg.use_dot else triton.next_power_of_2(m)
    # Whole BLOCK_K steps per split; splits that would start past K are dropped.
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    split = triton.cdiv(k, k_per_split)
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    ws = torch.empty(split, m, n, device=x.device, dtype=torch.float32) if split > 1 else out
    defer = (
        not cfg.use_dot and cfg.block_n * block_m * cfg.block_k <= _DEFER_REGS * 32 * cfg.num_warps
    )
    _skinny_gemm_kernel[(triton.cdiv(n, cfg.block_n), split)](
        x2, weight, bias if bias is not None else out, out, ws, m, n, k, x2.stride(0),
        weight.stride(0), k_per_split,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, USE_DOT=cfg.use_dot,
        DEFER=defer, EVEN_K=split * k_per_split == k, USE_WS=split > 1, HAS_BIAS=bias is not None,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        enable_fp_fusion=True,  # FMAs on the FMA path (newer tritons default to no fusion)
    )  # fmt: skip
    if split > 1:
        _splitk_reduce_kernel[(triton.cdiv(m * n, _REDUCE_BLOCK),)](
            ws, bias if bias is not None else out, out, n, m * n, SPLIT=split,
            HAS_BIAS=bias is not None, BLOCK=_REDUCE_BLOCK,
        )  # fmt: skip
    return out.view(*lead, n)
