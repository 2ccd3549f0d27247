"""One-row GEMVs for batch-1 decode, with their producer fused in: RMSNorm (+ residual add)
before q/k/v and gate/up, SiLU-and-mul before down, nothing before o and the LM head. With
``pdl=True`` they launch with PDL and load their first W tile before waiting for the producer.

W is [N, K] with unit stride along K. Every program owns BLOCK_N output features, recomputes
the (cheap, L2-resident) prologue vector chunk by chunk and streams its rows of W once; there is
no split over K, so no second kernel. The prologue rounds where ``parallm.kernels.elementwise``
rounds; the sums run in another order than the norm kernel's and cuBLAS's, so results agree to
float rounding, not bit for bit.

Quantized weights (int8, float8_e4m3fn) are read as stored, with ``weight_scale``: one float32
scale per output row, applied to each row's float32 sum, so the kernel streams a byte a weight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from parallm.kernels.elementwise import _NO_FMA, _round_to, silu_mul
from parallm.kernels.pdl import pdl_launch, wait_for_producer

_ONE_PASS_MAX = 8192  # rows up to this many elements are summed in one load (registers)

# Tiles (block_n, block_k, num_warps) per role, chosen with fused_gemv_bench.py's sweeps. Alone,
# a GEMV's best tile is the one that streams fastest; chained under PDL, what a CTA loads before
# its wait also counts (--chain-sweep). The o projection follows the latency-bound attention, so
# 4 x 2048 tiles (all of a CTA's W in one load, 4 CTAs a SM) hold the whole matrix in flight
# before the wait.
QKV_TILE = (8, 1024, 4)
GATE_UP_TILE = (32, 256, 4)  # outputs >= _WIDE_N: the gate/up projection
DOWN_TILE = (16, 2048, 8)
O_TILE = (4, 2048, 4)
LM_HEAD_TILE = (8, 1024, 4)  # outputs >= _WIDE_N (a vocabulary) without a prologue
# One-byte weights (int8, e4m3) have tiles of their own, chosen with quant_gemv_variants.py's
# and quant_gemv_bench.py's sweeps: a 16-bit tile with block_k doubled (the same bytes a tile)
# holds a float32 accumulator twice as large, which spills. Down takes 16 rows rather than the
# plain GEMV's best 8 so that half as many programs recompute the SiLU prologue, and 4 warps,
# the SiLU sweep's best for that tile (PERF_NOTES.md, issue 17).
QKV_TILE_1B = (32, 512, 4)
GATE_UP_TILE_1B = (16, 512, 4)
DOWN_TILE_1B = (16, 1024, 4)
O_TILE_1B = (8, 1024, 4)
_WIDE_N = 8192
_SMEM_BUDGET = 200 * 1024  # bytes of W pipeline stages per program


@triton.jit
def _w_tile(w_ptr, rows, stride_wn, k, offs_k, K):
    """W[rows, k:k+BLOCK_K] (zeros past K); edge rows are clamped by the caller, not masked."""
    cols = k + offs_k
    return tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :], mask=(cols < K)[None, :],
                   other=0.0)  # fmt: skip


@triton.jit
def weights_as(w, dtype: tl.constexpr):
    """A W tile in ``dtype`` (float32, bfloat16 or float16), exactly. int8 without an integer
    conversion (a quarter-rate instruction on the GPU, once per weight): the bits
    ``0x4B000080 + w`` are the float32 ``2**23 + 128 + w`` (exact below 2**24), so an integer
    add and a float subtract give ``w``; its bfloat16 is that float's high half (8 significant
    bits at most), its float16 ``0x6400 | (w + 128)`` (1024 + 128 + w) less 1152."""
    if w.dtype == tl.int8:
        if dtype == tl.float16:
            bits = (w.to(tl.uint8, bitcast=True) ^ 0x80).to(tl.int16) | 0x6400
            out = bits.to(tl.float16, bitcast=True) - 1152.0
        else:
            f32 = (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
            if dtype == tl.bfloat16:
                high = (f32.to(tl.int32, bitcast=True) >> 16).to(tl.int16)
                out = high.to(tl.bfloat16, bitcast=True)
            else:
                out = f32
    else:
        out = w.to(dtype)
    return out


@triton.jit
def _first_tile(w_ptr, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                PDL: tl.constexpr):  # fmt: skip
    """This program's rows and its first W tile, loaded before waiting for the producer: the
    weights never depend on it, so under PDL the load overlaps the previous kernel's tail."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    w0 = _w_tile(w_ptr, rows, stride_wn, 0, tl.arange(0, BLOCK_K), K)
    wait_for_producer(PDL)
    return offs_n, rows, w0


@triton.jit
def _finish(y_ptr, scale_ptr, offs_n, rows, acc, N, HAS_SCALE: tl.constexpr):
    """Each row's sum, times its weight scale when the weight is quantized, stored."""
    y = tl.sum(acc, axis=1)
    if HAS_SCALE:
        y = y * tl.load(scale_ptr + rows)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _norm_gemv_kernel(
    x_ptr, res_ptr, res_out_ptr, norm_w_ptr, ids_ptr, stride_x, inv_k, eps, w_ptr, scale_ptr,
    y_ptr, N, K, stride_wn, HAS_RESIDUAL: tl.constexpr, GATHER: tl.constexpr,
    HAS_SCALE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr, ONE_PASS: tl.constexpr, BLOCK_ALL: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    if GATHER:  # x is a table and the row's id a step input, so it loads before the PDL wait
        x_ptr += tl.load(ids_ptr).to(tl.int64) * stride_x
    offs_n, rows, w0 = _first_tile(w_ptr, N, K, stride_wn, BLOCK_N, BLOCK_K, PDL)
    STORE_SUM: tl.constexpr = HAS_RESIDUAL or GATHER
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    offs_k = tl.arange(0, BLOCK_K)
    # Pass 1: the row's sum of squares (x + residual rounded to x's dtype, as the norm does),
    # in one load when the row fits in registers: a loop of dependent L2 round trips here
    # delays the W stream behind it.
    if ONE_PASS:
        cols = tl.arange(0, BLOCK_ALL)
        h = _summed_chunk(x_ptr, res_ptr, res_out_ptr, cols, K, HAS_RESIDUAL, STORE_SUM, dtype)
        total = tl.sum(h * h, axis=0)
    else:
        sq = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            h = _summed_chunk(x_ptr, res_ptr, res_out_ptr, k + offs_k, K, HAS_RESIDUAL,
                              STORE_SUM, dtype)  # fmt: skip
            sq += h * h
        total = tl.sum(sq, axis=0)
    rstd = tl.rsqrt(total * inv_k + eps)
    # Pass 2: stream W; each chunk of the normalised vector is rebuilt from L2.
    v0 = _normed_chunk(x_ptr, res_ptr, norm_w_ptr, 0, offs_k, K, rstd, HAS_RESIDUAL, dtype)
    acc = weights_as(w0, tl.float32) * v0[None, :]
    for k in tl.range(BLOCK_K, K, BLOCK_K, num_stages=NUM_STAGES):
        v = _normed_chunk(x_ptr, res_ptr, norm_w_ptr, k, offs_k, K, rstd, HAS_RESIDUAL, dtype)
        acc += weights_as(_w_tile(w_ptr, rows, stride_wn, k, offs_k, K), tl.float32) * v[None, :]
    _finish(y_ptr, scale_ptr, offs_n, rows, acc, N, HAS_SCALE)


@triton.jit
def _sum_chunk(x_ptr, res_ptr, cols, K, HAS_RESIDUAL: tl.constexpr, dtype: tl.constexpr):
    """x (+ residual, rounded to the model dtype) at ``cols``, as float32."""
    h = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        h = _round_to(h + r, dtype)
    return h


@triton.jit
def _summed_chunk(x_ptr, res_ptr, res_out_ptr, cols, K, HAS_RESIDUAL: tl.constexpr,
                  STORE: tl.constexpr, dtype: tl.constexpr):  # fmt: skip
    """``_sum_chunk``; with ``STORE``, program 0 writes it out (the next norm's residual)."""
    h = _sum_chunk(x_ptr, res_ptr, cols, K, HAS_RESIDUAL, dtype)
    if STORE:  # noqa: SIM102 (a constexpr test, then a runtime one)
        if tl.program_id(0) == 0:
            tl.store(res_out_ptr + cols, h.to(dtype), mask=cols < K)
    return h


@triton.jit
def _normed_chunk(x_ptr, res_ptr, norm_w_ptr, k, offs_k, K, rstd, HAS_RESIDUAL: tl.constexpr,
                  dtype: tl.constexpr):  # fmt: skip
    cols = k + offs_k
    h = _sum_chunk(x_ptr, res_ptr, cols, K, HAS_RESIDUAL, dtype)
    g = tl.load(norm_w_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
    return _round_to(_round_to(h * rstd, dtype) * g, dtype)


@triton.jit
def _silu_chunk(gate_ptr, up_ptr, k, offs_k, K, PRECISE_EXP: tl.constexpr, dtype: tl.constexpr):
    cols = k + offs_k
    g = tl.load(gate_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
    return silu_mul(g, u, PRECISE_EXP, dtype)


@triton.jit
def _silu_gemv_kernel(
    gate_ptr, up_ptr, w_ptr, scale_ptr, y_ptr, N, K, stride_wn,
    HAS_SCALE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr, PRECISE_EXP: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    offs_n, rows, w0 = _first_tile(w_ptr, N, K, stride_wn, BLOCK_N, BLOCK_K, PDL)
    dtype: tl.constexpr = gate_ptr.dtype.element_ty
    offs_k = tl.arange(0, BLOCK_K)
    v0 = _silu_chunk(gate_ptr, up_ptr, 0, offs_k, K, PRECISE_EXP, dtype)
    acc = weights_as(w0, tl.float32) * v0[None, :]
    for k in tl.range(BLOCK_K, K, BLOCK_K, num_stages=NUM_STAGES):
        v = _silu_chunk(gate_ptr, up_ptr, k, offs_k, K, PRECISE_EXP, dtype)
        acc += weights_as(_w_tile(w_ptr, rows, stride_wn, k, offs_k, K), tl.float32) * v[None, :]
    _finish(y_ptr, scale_ptr, offs_n, rows, acc, N, HAS_SCALE)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, scale_ptr, y_ptr, N, K, stride_wn, HAS_SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    offs_n, rows, w0 = _first_tile(w_ptr, N, K, stride_wn, BLOCK_N, BLOCK_K, PDL)
    offs_k = tl.arange(0, BLOCK_K)
    x0 = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
    acc = weights_as(w0, tl.float32) * x0[None, :]
    for k in tl.range(BLOCK_K, K, BLOCK_K, num_stages=NUM_STAGES):
        cols = k + offs_k
        x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        acc += weights_as(_w_tile(w_ptr, rows, stride_wn, k, offs_k, K), tl.float32) * x[None, :]
    _finish(y_ptr, scale_ptr, offs_n, rows, acc, N, HAS_SCALE)


def role_tile(role: str, weight: torch.Tensor) -> tuple[int, int, int]:
    """The tile of ``role`` (qkv, gate_up, down, o or lm_head) for ``weight``'s width. Read at
    call time, so that a benchmark may set the module's constants."""
    tiles = {"qkv": (QKV_TILE, QKV_TILE_1B), "gate_up": (GATE_UP_TILE, GATE_UP_TILE_1B),
             "down": (DOWN_TILE, DOWN_TILE_1B), "o": (O_TILE, O_TILE_1B),
             "lm_head": (LM_HEAD_TILE, O_TILE_1B)}  # fmt: skip
    if role not in tiles:
        raise ValueError(f"role must be one of {', '.join(tiles)}, got {role!r}")
    return tiles[role][weight.element_size() == 1]


def _tile(role: str, block_n: int | None, block_k: int | None, num_warps: int | None,
          weight: torch.Tensor, num_stages: int) -> tuple[int, int, int]:  # fmt: skip
    """The role's tile (``role_tile``) where an argument is left out; a default block_k is
    halved until the W stages fit in shared memory (float32 weights would overflow a Hopper
    block's 227 KiB)."""
    default = role_tile(role, weight)
    block_n, warps = block_n or default[0], num_warps or default[2]
    if block_k is None:
        block_k = default[1]
        while num_stages * block_n * block_k * weight.element_size() > _SMEM_BUDGET:
            block_k //= 2
    return block_n, block_k, warps


def _launch(kernel, head: tuple, row: torch.Tensor, k: int, weight: torch.Tensor,
            weight_scale: torch.Tensor | None, tile: tuple[int, int, int], num_stages: int,
            pdl: bool, **constexprs) -> torch.Tensor:  # fmt: skip
    """Checks the row ``[1, K]`` and ``weight [N, K]`` (a quantized one needs its per-row
    float32 ``weight_scale [N]``) and runs ``kernel(*head, W, scale, y, N, K, ...)``; returns
    y [1, N] in the row's dtype."""
    if row.dim() != 2 or row.shape[0] != 1 or row.stride(-1) != 1:
        raise ValueError(f"x must be one contiguous row [1, K], got {tuple(row.shape)}")
    if weight.dim() != 2 or weight.shape[1] != k or weight.stride(1) != 1:
        raise ValueError(f"weight must be [N, {k}] with unit stride along K")
    n = weight.shape[0]
    if weight.dtype in (torch.int8, torch.float8_e4m3fn) and weight_scale is None:
        raise ValueError(f"weight_scale is needed for a {weight.dtype} weight")
    if weight_scale is not None and (
        weight_scale.shape != (n,) or weight_scale.dtype != torch.float32
        or weight_scale.stride(0) != 1
    ):  # fmt: skip
        raise ValueError(f"weight_scale must be contiguous float32 [{n}], got "
                         f"{weight_scale.dtype} {tuple(weight_scale.shape)}")  # fmt: skip
    y = torch.empty(1, n, dtype=row.dtype, device=row.device)
    block_n, block_k, num_warps = tile
    kernel[(triton.cdiv(n, block_n),)](
        *head, weight, weight_scale if weight_scale is not None else y, y, n, k, weight.stride(0),
        HAS_SCALE=weight_scale is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        NUM_STAGES=num_stages, num_warps=num_warps, **constexprs, **_NO_FMA,
        **pdl_launch(row, pdl),
    )  # fmt: skip
    return y


def rms_norm_gemv(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 3,
    gather_ids: torch.Tensor | None = None,
    pdl: bool = False,
    weight_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(rms_norm(x + residual) @ weight.T, x + residual)`` for one row ``x`` of [1, K].
    Tiles left out are the gate/up role's (wide outputs) or q/k/v's (``role_tile``).

    With ``gather_ids`` (one integer id on the device), ``x`` is a table [V, K] (the token
    embedding) and the row is ``x[gather_ids[0]]``, read by the kernel itself: the first
    layer of a one-row step then needs no embedding kernel. Returns ``(y, that row)``.
    """
    k = x.shape[-1]
    row = x
    if gather_ids is not None:
        if residual is not None or x.dim() != 2 or x.stride(-1) != 1:
            raise ValueError("gather_ids: x must be a [V, K] table with unit stride along K, "
                             "and residual None")  # fmt: skip
        if gather_ids.shape != (1,) or gather_ids.is_floating_point():
            raise ValueError(f"gather_ids must be one integer id, got {tuple(gather_ids.shape)}")
        row = x[:1]
    role = "gate_up" if weight.shape[0] >= _WIDE_N else "qkv"
    tile = _tile(role, block_n, block_k, num_warps, weight, num_stages)
    stored = residual is not None or gather_ids is not None
    res_out = torch.empty_like(row) if stored else None
    res = residual if residual is not None else row
    block_all = triton.next_power_of_2(k)
    head = (x, res, res_out if stored else row, norm_weight,
            gather_ids if gather_ids is not None else row, x.stride(0), 1.0 / k, eps)  # fmt: skip
    y = _launch(_norm_gemv_kernel, head, row, k, weight, weight_scale, tile, num_stages, pdl,
                HAS_RESIDUAL=residual is not None, GATHER=gather_ids is not None,
                ONE_PASS=block_all <= _ONE_PASS_MAX, BLOCK_ALL=block_all)  # fmt: skip
    return y, res_out


def silu_mul_gemv(
    gate_up: torch.Tensor,
    weight: torch.Tensor,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 3,
    pdl: bool = False,
    weight_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(silu(gate) * up) @ weight.T`` for one row ``gate_up`` of [1, 2K] (gate, then up).
    Tiles left out are the down role's (``role_tile``)."""
    k = gate_up.shape[-1] // 2
    tile = _tile("down", block_n, block_k, num_warps, weight, num_stages)
    return _launch(_silu_gemv_kernel, (gate_up, gate_up[:, k:]), gate_up, k, weight,
                   weight_scale, tile, num_stages, pdl, PRECISE_EXP=gate_up.is_cuda)  # fmt: skip


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 3,
    pdl: bool = False,
    weight_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ weight.T`` for one row ``x`` of [1, K] (the o projection and LM head, so that the
    whole one-row step is Triton kernels that chain with PDL). Tiles left out are the LM
    head's (wide outputs) or o's (``role_tile``)."""
    role = "lm_head" if weight.shape[0] >= _WIDE_N else "o"
    tile = _tile(role, block_n, block_k, num_warps, weight, num_stages)
    return _launch(_gemv_kernel, (x,), x, x.shape[-1], weight, weight_scale, tile, num_stages, pdl)
