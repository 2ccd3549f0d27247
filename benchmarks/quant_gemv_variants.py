"""Cheaper weight conversions in the one-row GEMV over one-byte weights, against the package's
kernel (``parallm.kernels.gemv.gemv``) and against bf16 weights (needs CUDA to time).

The question (issue 17): batch-1 decode with int8 or fp8 weights reads half the bytes of bf16
yet is no faster. The package's GEMV converted every weight with ``w.to(tl.float32)`` (it has
since adopted ``int8_magic`` for int8, from this study; ``convert_fma`` keeps the cast): for int8
one I2F per weight (on sm_90 conversions issue at 16 a clock per SM against 128 FFMA), for e4m3
one F2FP unpack per two weights and one HADD2.F32 per weight; and it is compiled without FP
fusion (a FMUL and a FADD per weight). The hypothesis: that per-weight work, not the bytes,
bounds the kernel. Each variant below computes the same plain GEMV ``y[n] = scale[n] * sum_k
W[n, k] x[k]`` (W [N, K] int8 or float8_e4m3fn with unit stride along K, one float32 scale per
row, x one row [1, K]) with less of it:

- ``baseline``: the package's ``gemv`` as it is.
- ``convert_fma``: the same conversion, compiled with FP fusion (FFMA): separates what the
  fusion gives from what the conversions cost.
- ``int8_magic``: int8 -> float32 without I2F: sign-extend, add 0x4B000080 (the bits of
  ``2**23 + 128 + w``), reinterpret as float32, subtract ``2**23 + 128`` (exact: every operand and
  the result are integers below ``2**24``). An IADD and a FADD instead of a conversion.
- ``int8_magic_or``: the same float built from the byte ``w ^ 0x80`` zero-extended and OR-ed
  into 0x4B000000: a byte insert (PRMT) the compiler can do four bytes at a time.
- ``int8_tensor_core``: the int8 tile converted exactly to x's dtype (bf16: the magic float's
  top half, which holds every int8 value exactly; fp16: the 16-bit magic ``0x6400 | (w ^ 0x80)``
  minus 1152; float32: the magic float), then ``tl.dot`` (swap-AB: W tile [BLOCK_N, BLOCK_K]
  times x^T [BLOCK_K, 16], x the first of 16 columns, the rest zero) with float32 sums.
- ``fp8_tensor_core``: x quantized per token to e4m3 (``parallm.kernels.quant_gemv.per_token_fp8``,
  the activations of the package's fp8 GEMM path), then the e4m3 W tile times the e4m3 x^T tile
  with ``tl.dot`` as stored (no conversion), float32 sums, times both scales. Timed with the
  quantization kernel; ``fp8_tensor_core_prequant`` times the dot kernel alone on x quantized
  once (its cost once the producer of x writes it in e4m3). This changes the numerics: x keeps
  e4m3's 3 mantissa bits (``FP8_ACT_TOL``).
- ``int8_imma`` / ``int8_imma_prequant``: the same with x quantized per token to int8
  (``per_token_int8``, symmetric, max|x| -> 127) and int8 x int8 tensor-core products summed
  exactly in int32 (vLLM's W8A8 int8 without smoothing; ``INT8_ACT_TOL``).

Tensor-core tiles need ``block_n`` a multiple of 64 per 4 warps for Hopper's wgmma; smaller ones
compile to mma.sync, which for e4m3 converts both operands to fp16 first (see ``--sass``).

Checks (before any timing; a variant that fails one is not timed and the script exits 1):
every conversion over all 256 byte values equals PyTorch's cast bit for bit (compiled, on this
GPU); every variant's y on fresh random data (a ragged shape, then each timed shape and tile)
against a float64 reference: within ``EXACT_TOL`` (the output's rounding, float32 sums in
another order; for e4m3 tensor cores, their accumulator's ``FP8_MMA_TOL``) for the exact
variants; those that quantize x within that bound of the float64 GEMV over their quantized x
(their twin) and within their ``act_tol`` of the float one.

Timing: each projection's plain GEMV (``quant_gemv_bench.SHAPES``, prologues left out) with the
method of ``quant_gemv_bench.py`` (a CUDA graph cycling through copies of W larger than L2), at
the package's tile for that role and a few others (``--no-sweep``: the first only). bf16 is the
package's ``gemv`` at the role's tile. The summary adds each variant's best tiles over a
layer's four projections.

``--sass`` needs no GPU: it compiles every variant for sm_90 with the Triton install's ptxas
and counts the instructions of each kernel's main loop per weight, by kind (issue slots, the
integer ALU, conversions, FP32), with the clocks per weight an SM needs by the sm_90 rates of
the CUDA programming guide (the prediction to measure; not a timing).

python benchmarks/quant_gemv_variants.py [--models 8b,1b] [--no-sweep] [--out variants.json]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quant_gemv_bench import L2_BYTES, SHAPES, _weights, comma_list, time_us  # noqa: E402

from parallm.kernels import gemv as package_gemv  # noqa: E402
from parallm.kernels.quant_gemv import per_token_fp8  # noqa: E402

KINDS = ("int8", "fp8")
WEIGHT_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
# Relative (Frobenius) error bounds against the float64 reference. Exact conversions leave
# float32 sums in another order and the output's rounding: within one ulp of the output dtype
# (2**-7 relative for bf16, 2**-10 for fp16), which a truncating cast (the interpreter's) meets.
EXACT_TOL = {torch.bfloat16: 8e-3, torch.float16: 2e-3, torch.float32: 1e-5}
# e4m3 activations: each x element is rounded to 3 mantissa bits (within 2**-4 relative, about
# 2.5% RMS for normal-range values), so y moves by about that much: 2.0-3.4% on random rows
# with K 64..14336 (float64, on CPU); 6% leaves room and still fails a wrong scale.
FP8_ACT_TOL = 0.06
# int8 activations (symmetric per token, max|x| -> 127): 0.5-1.4% on the same rows; 3% bound.
# Gaussian rows are kind to int8: a real row's outlier channels raise max|x| and the error.
INT8_ACT_TOL = 0.03
# Hopper's e4m3 MMA sums in fewer bits than float32: over all of K in one accumulator chain
# the error against float64 was 1.1e-3 (K 3000) and 3.0e-3 (K 14336) on an H100 (fac8c1a),
# growing with the chain. Promoted every block_k (``PROMOTE``) a chain is 128-256 products long;
# 1e-3 still fails an unpromoted kernel at K 3000 and above.
FP8_MMA_TOL = 1e-3
DOT_ROWS = 16  # tl.dot's smallest N: x^T is padded to 16 columns, only the first is used
# (block_n, block_k, num_warps) tried besides the role's tile; three one-byte stages fit the
# package's shared-memory budget. More rows a thread share each converted x element (--sass).
# Tensor-core tiles need block_n >= 16 (tl.dot's M); wgmma needs 64 rows per 4 warps.
CUDA_CORE_TILES = [(8, 1024, 4), (16, 1024, 8), (32, 512, 4), (16, 512, 4)]
DOT_TILES = [(64, 256, 4), (64, 512, 4), (128, 256, 8), (32, 512, 4)]
NUM_STAGES = 3
DEVICE = "cuda"
CHECK_SHAPE = (1000, 3000)  # ragged: edge rows and a partial last K tile
MAGIC_F32 = 8388736.0  # 2**23 + 128: the float32 whose bits are 0x4B000080 (kernels: literal)


@triton.jit
def int8_magic(w):
    """int8 -> float32 with an IADD and a FADD: the bits ``0x4B000080 + w`` are the float32
    ``2**23 + 128 + w`` (an integer below 2**24, so exact), minus ``2**23 + 128``."""
    bits = w.to(tl.int32) + 0x4B000080
    return bits.to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def int8_magic_or(w):
    """``int8_magic``'s float built by a byte insert: ``w ^ 0x80`` is ``w + 128`` as an unsigned
    byte, OR-ed into the low byte of 0x4B000000."""
    u = w.to(tl.uint8, bitcast=True) ^ 0x80
    bits = u.to(tl.int32) | 0x4B000000
    return bits.to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def int8_to(w, dtype: tl.constexpr):
    """int8 -> ``dtype`` (bfloat16, float16 or float32) without an integer conversion, exact."""
    if dtype == tl.bfloat16:
        # An int8 value has at most 8 significant bits, so the float32's low half is zero and
        # its high half is the bfloat16 of the same value.
        high = int8_magic(w).to(tl.int32, bitcast=True) >> 16
        out = high.to(tl.int16).to(tl.bfloat16, bitcast=True)
    elif dtype == tl.float16:
        # 0x6400 is 1024, whose float16 spacing is 1: 0x6400 | (w + 128) is 1024 + 128 + w.
        bits = (w.to(tl.uint8, bitcast=True) ^ 0x80).to(tl.int16) | 0x6400
        out = bits.to(tl.float16, bitcast=True) - 1152.0
    else:
        out = int8_magic(w)
    return out


# int8_prmt: four weights share a 32-bit register; one XOR flips their sign bits (w ^ 0x80 is
# w + 128 as an unsigned byte), then one PRMT per weight builds 0x4B0000uu: byte 0 the weight's
# byte (selector nibble j), bytes 1-2 zero and byte 3 0x4B from PRMT_MAGIC (nibbles 4, 5, 7).
PRMT_FLIP = 0x80808080
PRMT_MAGIC = 0x4B000000
PRMT_SELECTORS = (0x7540, 0x7541, 0x7542, 0x7543)
_PRMT_ASM = tl.constexpr(
    "{ .reg .b32 t, m; "
    f"xor.b32 t, $4, {PRMT_FLIP:#x}; mov.b32 m, {PRMT_MAGIC:#x}; "
    + " ".join(f"prmt.b32 ${j}, t, m, {sel:#x};" for j, sel in enumerate(PRMT_SELECTORS))
    + " }"
)


@triton.jit
def int8_prmt(w):
    """``int8_magic``'s float with one PRMT per weight (inline PTX; not in the interpreter)."""
    bits = tl.inline_asm_elementwise(_PRMT_ASM, "=r,=r,=r,=r,r", [w], dtype=tl.int32,
                                     is_pure=True, pack=4)  # fmt: skip
    return bits.to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def _convert(w, CONVERT: tl.constexpr):
    if CONVERT == "int8_magic":
        out = int8_magic(w)
    elif CONVERT == "int8_magic_or":
        out = int8_magic_or(w)
    elif CONVERT == "int8_prmt":
        out = int8_prmt(w)
    else:
        out = w.to(tl.float32)
    return out


@triton.jit
def _convert_kernel(q_ptr, y_ptr, n, CONVERT: tl.constexpr, BLOCK: tl.constexpr):
    """``y = convert(q)`` elementwise: the conversions alone, for the exactness checks.
    ``CONVERT``: a ``_convert`` name (float32 out) or ``int8_to`` (y's dtype)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(q_ptr + offs, mask=offs < n, other=0.0)
    y = int8_to(w, y_ptr.dtype.element_ty) if CONVERT == "int8_to" else _convert(w, CONVERT)
    tl.store(y_ptr + offs, y, mask=offs < n)


def convert(q: torch.Tensor, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q`` (int8 or e4m3, 1-D) converted by the kernels' conversion ``name`` into ``dtype``
    (``int8_to`` takes bfloat16, float16 or float32; the others give float32)."""
    y = torch.empty(q.shape, dtype=dtype, device=q.device)
    block = 2048  # 16 bytes a thread (4 warps), as the GEMVs load them: int8_prmt packs 4
    _convert_kernel[(triton.cdiv(q.numel(), block),)](q, y, q.numel(), CONVERT=name, BLOCK=block,
                                                      enable_fp_fusion=True)  # fmt: skip
    return y


@triton.jit
def _gemv_convert_kernel(x_ptr, w_ptr, scale_ptr, y_ptr, N, K, stride_wn,
                         CONVERT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         NUM_STAGES: tl.constexpr):  # fmt: skip
    """The package's plain GEMV loop (rows clamped at the edge, K masked) with ``_convert``."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        cols = k + offs_k
        x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :],
                    mask=(cols < K)[None, :], other=0.0)  # fmt: skip
        acc += _convert(w, CONVERT) * x[None, :]
    y = tl.sum(acc, axis=1) * tl.load(scale_ptr + rows)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _gemv_dot_kernel(x_ptr, x_scale_ptr, w_ptr, scale_ptr, y_ptr, N, K, stride_wn,
                     CONVERT_W: tl.constexpr, INT_ACC: tl.constexpr, HAS_X_SCALE: tl.constexpr,
                     PROMOTE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     DOT_ROWS: tl.constexpr, NUM_STAGES: tl.constexpr):  # fmt: skip
    """Swap-AB GEMV on tensor cores: acc [BLOCK_N, DOT_ROWS] += W tile @ x^T tile, where the
    x^T tile's first column is x and the others are zero (masked loads, never read). With
    ``CONVERT_W`` the int8 W tile becomes x's float dtype first (``int8_to``); without, W and x
    share a one-byte dtype (e4m3, or int8 with int32 sums: ``INT_ACC``). ``PROMOTE`` (e4m3)
    adds each tile's product to the float32 sums outside the MMA: Hopper's fp8 MMA keeps fewer
    accumulator bits than float32 (``FP8_MMA_TOL``), so a chain over all of K would lose them
    on every tile (DeepSeek-V3's promotion to CUDA cores, every block_k here)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, DOT_ROWS)
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    if INT_ACC:
        acc = tl.zeros([BLOCK_N, DOT_ROWS], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_N, DOT_ROWS], dtype=tl.float32)
    for k in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        cols = k + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * 0 + cols[None, :],
                    mask=(offs_m[:, None] == 0) & (cols < K)[None, :], other=0.0)  # fmt: skip
        w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :],
                    mask=(cols < K)[None, :], other=0.0)  # fmt: skip
        if CONVERT_W:
            w = int8_to(w, dtype)
        if PROMOTE:
            acc += tl.dot(w, tl.trans(x), input_precision=PRECISION, out_dtype=tl.float32)
        else:
            acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION, out_dtype=acc.dtype)
    sums = tl.sum(tl.where(offs_m[None, :] == 0, acc, 0), axis=1).to(tl.float32)
    y = sums * tl.load(scale_ptr + rows)
    if HAS_X_SCALE:
        y = y * tl.load(x_scale_ptr)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _per_token_int8_kernel(x_ptr, q_ptr, scale_ptr, K, BLOCK_K: tl.constexpr):
    """One row: ``scale = max(|x|, 1e-12) / 127``, ``q = round_half_even(x / scale)``."""
    cols = tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12), 127.0)
    v = tl.math.div_rn(x, scale)  # |v| <= 127: adding 1.5 * 2**23 rounds it half to even
    r = (v + 12582912.0) - 12582912.0
    tl.store(scale_ptr, scale)
    tl.store(q_ptr + cols, tl.clamp(r, -127.0, 127.0).to(tl.int8), mask=cols < K)


def per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One row ``x [1, K]`` -> ``(int8 [1, K], float32 scale [1, 1])``: symmetric, round half to
    even (``per_token_int8_ref`` is the PyTorch twin)."""
    if x.dim() != 2 or x.shape[0] != 1 or x.stride(-1) != 1:
        raise ValueError(f"x must be one contiguous row [1, K], got {tuple(x.shape)}")
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(1, 1, dtype=torch.float32, device=x.device)
    block_k = triton.next_power_of_2(x.shape[1])
    _per_token_int8_kernel[(1,)](x, q, scale, x.shape[1], BLOCK_K=block_k,
                                 num_warps=min(16, max(4, block_k // 1024)),
                                 enable_fp_fusion=False)  # fmt: skip
    return q, scale


def per_token_int8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_token_int8`` in PyTorch."""
    x = x.float()
    scale = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale


def _check_args(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> None:
    if x.dim() != 2 or x.shape[0] != 1 or x.stride(-1) != 1:
        raise ValueError(f"x must be one contiguous row [1, K], got {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1] or weight.stride(1) != 1:
        raise ValueError(f"weight must be [N, {x.shape[1]}] with unit stride along K")
    if scale.shape != (weight.shape[0],) or scale.dtype != torch.float32:
        raise ValueError(f"scale must be float32 [{weight.shape[0]}], got {scale.dtype} "
                         f"{tuple(scale.shape)}")  # fmt: skip


def gemv_convert(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, convert: str,
                 block_n: int, block_k: int, num_warps: int) -> torch.Tensor:  # fmt: skip
    """The plain GEMV with conversion ``convert`` (``cast`` or an int8 one of ``_convert``),
    compiled with FP fusion: y [1, N] in x's dtype."""
    _check_args(x, weight, scale)
    if convert != "cast" and weight.dtype != torch.int8:
        raise ValueError(f"{convert} converts int8 weights, got {weight.dtype}")
    n, k = weight.shape
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _gemv_convert_kernel[(triton.cdiv(n, block_n),)](
        x, weight, scale, y, n, k, weight.stride(0), CONVERT=convert, BLOCK_N=block_n,
        BLOCK_K=block_k, NUM_STAGES=NUM_STAGES, num_warps=num_warps, enable_fp_fusion=True,
    )  # fmt: skip
    return y


def gemv_dot(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block_n: int,
             block_k: int, num_warps: int, x_scale: torch.Tensor | None = None,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:  # fmt: skip
    """The swap-AB tensor-core GEMV, y [1, N] in ``out_dtype`` (default: x's dtype). int8
    ``weight`` with x in bf16, fp16 or float32: the weight converted exactly to x's dtype. int8
    or e4m3 ``weight`` with x of the same dtype and its float32 ``x_scale`` [1, 1]: both read
    as stored (int8: exact int32 sums)."""
    _check_args(x, weight, scale)
    convert_w = weight.dtype == torch.int8 and x.dtype.is_floating_point and x.element_size() > 1
    if convert_w and x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"an int8 weight needs x in bf16, fp16 or float32, got {x.dtype}")
    if not convert_w and (x.dtype != weight.dtype or x_scale is None):
        raise ValueError(f"a {weight.dtype} weight needs x in a 16/32-bit float (int8 weights "
                         f"only) or in {weight.dtype} with its x_scale, got {x.dtype}")  # fmt: skip
    if block_n < DOT_ROWS:
        raise ValueError(f"block_n must be >= {DOT_ROWS} (tl.dot's smallest M), got {block_n}")
    n, k = weight.shape
    y = torch.empty(1, n, dtype=out_dtype or x.dtype, device=x.device)
    _gemv_dot_kernel[(triton.cdiv(n, block_n),)](
        x, x_scale if x_scale is not None else scale, weight, scale, y, n, k, weight.stride(0),
        CONVERT_W=convert_w, INT_ACC=x.dtype == torch.int8, HAS_X_SCALE=x_scale is not None,
        PROMOTE=x.dtype == torch.float8_e4m3fn,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", BLOCK_N=block_n,
        BLOCK_K=block_k, DOT_ROWS=DOT_ROWS, NUM_STAGES=NUM_STAGES, num_warps=num_warps,
        enable_fp_fusion=True,
    )  # fmt: skip
    return y


Gemv = Callable[..., torch.Tensor]  # f(weight, scale, block_n=, block_k=, num_warps=) -> y


@dataclass(frozen=True)
class Variant:
    """``bind(x)`` returns the variant's GEMV on the fixed row x (its setup, such as quantizing
    x once, happens there, outside the timed call) and the float64 row its output must match
    within ``EXACT_TOL``: x itself for exact variants; for those that quantize x (``act_tol``
    set), the quantized x dequantized, and the output must also be within ``act_tol`` of the
    float GEMV of x."""

    name: str
    kinds: tuple[str, ...]
    tensor_core: bool
    bind: Callable[[torch.Tensor], tuple[Gemv, torch.Tensor]]
    act_tol: float | None = None
    mma_tol: float = 0.0  # the tensor cores' own summing error, where it exceeds EXACT_TOL's

    def tiles(self, role: str, weight: torch.Tensor, sweep: bool) -> list[tuple[int, int, int]]:
        """The role's package tile first (tensor-core variants: ``DOT_TILES[0]``), then, with
        ``sweep``, the others."""
        if self.tensor_core:
            first, more = DOT_TILES[0], DOT_TILES[1:]
        else:
            first = package_gemv._tile(role, None, None, None, weight, NUM_STAGES)
            more = [t for t in CUDA_CORE_TILES if t != first]
        return [first, *more] if sweep else [first]


def _baseline(x):
    def run(w, s, block_n, block_k, num_warps):
        return package_gemv.gemv(x, w, block_n, block_k, num_warps, NUM_STAGES, weight_scale=s)

    return run, x.double()


def _converting(convert: str):
    def bind(x):
        return lambda w, s, **tile: gemv_convert(x, w, s, convert, **tile), x.double()

    return bind


def _int8_tensor_core(x):
    return lambda w, s, **tile: gemv_dot(x, w, s, **tile), x.double()


def _quantized_x(quantize: Callable):
    """The variant that quantizes x per token with ``quantize`` at every call (its cost timed
    with the GEMV), and the one that reads x quantized once (the cost once the producer of x
    writes it quantized). Their reference row is the quantized x, dequantized."""

    def bind(x):
        def run(w, s, **tile):
            xq, xs = quantize(x)
            return gemv_dot(xq, w, s, x_scale=xs, out_dtype=x.dtype, **tile)

        xq, xs = quantize(x)
        return run, xq.double() * xs.double()

    def bind_prequant(x):
        xq, xs = quantize(x)
        run = lambda w, s, **tile: gemv_dot(xq, w, s, x_scale=xs, out_dtype=x.dtype, **tile)  # noqa: E731
        return run, xq.double() * xs.double()

    return bind, bind_prequant


_FP8_X, _FP8_X_PREQUANT = _quantized_x(per_token_fp8)
_INT8_X, _INT8_X_PREQUANT = _quantized_x(per_token_int8)
VARIANTS = {v.name: v for v in [
    Variant("baseline", KINDS, False, _baseline),
    Variant("convert_fma", KINDS, False, _converting("cast")),
    Variant("int8_magic", ("int8",), False, _converting("int8_magic")),
    Variant("int8_magic_or", ("int8",), False, _converting("int8_magic_or")),
    Variant("int8_prmt", ("int8",), False, _converting("int8_prmt")),
    Variant("int8_tensor_core", ("int8",), True, _int8_tensor_core),
    Variant("int8_imma", ("int8",), True, _INT8_X, act_tol=INT8_ACT_TOL),
    Variant("int8_imma_prequant", ("int8",), True, _INT8_X_PREQUANT, act_tol=INT8_ACT_TOL),
    Variant("fp8_tensor_core", ("fp8",), True, _FP8_X, act_tol=FP8_ACT_TOL,
            mma_tol=FP8_MMA_TOL),
    Variant("fp8_tensor_core_prequant", ("fp8",), True, _FP8_X_PREQUANT, act_tol=FP8_ACT_TOL,
            mma_tol=FP8_MMA_TOL),
]}  # fmt: skip
# The conversions the exact variants rely on: (name, output dtype, weight kind, variants).
CONVERSIONS = [
    ("cast", torch.float32, "int8", ("baseline", "convert_fma")),
    ("cast", torch.float32, "fp8", ("baseline", "convert_fma")),
    ("int8_magic", torch.float32, "int8", ("int8_magic",)),
    ("int8_magic_or", torch.float32, "int8", ("int8_magic_or",)),
    ("int8_prmt", torch.float32, "int8", ("int8_prmt",)),
    ("int8_to", torch.bfloat16, "int8", ("int8_tensor_core",)),
    ("int8_to", torch.float16, "int8", ("int8_tensor_core",)),
    ("int8_to", torch.float32, "int8", ("int8_tensor_core",)),
]


def all_bytes(kind: str, device: str | torch.device) -> torch.Tensor:
    """Every byte value 0..255 as a 1-D weight of ``kind``."""
    return torch.arange(256, dtype=torch.uint8, device=device).view(WEIGHT_DTYPES[kind])


def conversion_mismatches(name: str, dtype: torch.dtype, kind: str, device) -> list[int]:
    """The byte values (0..255) whose conversion is not PyTorch's cast bit for bit (NaN bytes
    must give a NaN)."""
    q = all_bytes(kind, device)
    got, want = convert(q, name, dtype).cpu(), q.to(dtype).cpu()
    same = (got.view(_int_view(dtype)) == want.view(_int_view(dtype))) | (
        got.isnan() & want.isnan()
    )
    return [int(b) for b in torch.nonzero(~same).flatten()]


def _int_view(dtype: torch.dtype) -> torch.dtype:
    return {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[
        dtype
    ]


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


def reference(x64: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float64 ``(x @ q^T) * scale``, [1, N]."""
    return (x64 @ q.float().double().T) * scale.double()


def random_weights(n: int, k: int, kind: str, device, seed: int):
    """``(q, scale)``: a random [n, k] weight whose rows span two decades, quantized as the
    package quantizes (never zeros)."""
    from parallm.layers.quantization import WEIGHT_FORMATS

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5 * torch.logspace(-1, 1, n)[:, None]
    q, scale = WEIGHT_FORMATS[kind].quantize(w)
    return q.to(device), scale.to(device)


def random_row(k: int, dtype: torch.dtype, device, seed: int) -> torch.Tensor:
    return torch.randn(1, k, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


def check_output(variant: Variant, y: torch.Tensor, x: torch.Tensor, ref_x: torch.Tensor,
                 q: torch.Tensor, scale: torch.Tensor) -> list[str]:  # fmt: skip
    """What is wrong with ``y``, the variant's GEMV of row ``x`` (its bound reference row
    ``ref_x``) over ``(q, scale)``: [] when nothing."""
    problems = []
    if y.shape != (1, q.shape[0]) or y.dtype != x.dtype:
        return [f"y is {y.dtype} {tuple(y.shape)}, want {x.dtype} (1, {q.shape[0]})"]
    tol = max(EXACT_TOL[x.dtype], variant.mma_tol)
    err = rel_error(y, reference(ref_x, q, scale))
    if not err < tol:
        problems.append(f"relative error {err:.2e} against its reference (bound {tol:.0e})")
    if variant.act_tol is not None:
        err = rel_error(y, reference(x.double(), q, scale))
        if not err < variant.act_tol:
            problems.append(f"relative error {err:.2e} against the float x (bound "
                            f"{variant.act_tol})")  # fmt: skip
    return problems


def check_variant(variant: Variant, kind: str, device, tiles, n: int, k: int, dtype,
                  seed: int = 0) -> list[str]:  # fmt: skip
    """The variant's GEMV at each tile on fresh random data of [n, k], checked (``check_output``)."""
    q, scale = random_weights(n, k, kind, device, seed=seed + n + k)
    x = random_row(k, dtype, device, seed=seed + k)
    fn, ref_x = variant.bind(x)
    problems = []
    for bn, bk, warps in tiles:
        y = fn(q, scale, block_n=bn, block_k=bk, num_warps=warps)
        problems += [f"tile {(bn, bk, warps)}: {p}" for p in check_output(variant, y, x, ref_x,
                                                                           q, scale)]  # fmt: skip
    return problems


# --- on the GPU ----------------------------------------------------------------------------


def _guarded(what: str, failed: set, key: tuple[str, str], fn: Callable[[], list[str]]) -> bool:
    """Runs ``fn`` (returns problems); a problem or an exception (a kernel that does not compile
    on this GPU, say) adds ``key`` to ``failed`` and is printed. True when all went well."""
    try:
        problems = fn()
    except Exception as e:  # noqa: BLE001 (one variant's failure must not stop the others)
        problems = [f"{type(e).__name__}: {str(e).strip()[-600:]}"]
    print(f"{what}: {'ok' if not problems else 'FAILED'}")
    for p in problems:
        print(f"    {p}")
    if problems:
        failed.add(key)
    return not problems


def run_checks(names: list[str], kinds: list[str], device="cuda") -> set[tuple[str, str]]:
    """The exactness and random-data checks; returns the (variant, kind) pairs that failed."""
    failed: set[tuple[str, str]] = set()
    for conv, dtype, kind, users in CONVERSIONS:
        if kind not in kinds or not set(users) & set(names):
            continue

        def mismatches(conv=conv, dtype=dtype, kind=kind):
            wrong = conversion_mismatches(conv, dtype, kind, device)
            return [f"not exact for bytes {wrong[:16]}"] if wrong else []

        if not _guarded(f"conversion {conv} {kind} -> {dtype}, all 256 bytes", set(),
                        (conv, kind), mismatches):  # fmt: skip
            failed |= {(user, kind) for user in users}
    n, k = CHECK_SHAPE
    for name in names:
        variant = VARIANTS[name]
        for kind in (kd for kd in variant.kinds if kd in kinds):
            tiles = variant.tiles("o", torch.empty(1, 1, dtype=WEIGHT_DTYPES[kind]), sweep=True)
            _guarded(f"{name} {kind} [{n}, {k}] at {len(tiles)} tiles", failed, (name, kind),
                     lambda v=variant, kd=kind, t=tiles: check_variant(v, kd, device, t, n, k,
                                                                      torch.bfloat16))  # fmt: skip
    return failed


def _row(model, role, n, k, kind, variant, tile, us, bytes_per_weight) -> dict:
    return {"model": model, "role": role, "n": n, "k": k, "weights": kind, "variant": variant,
            "tile": list(tile), "us": us, "gb_s": n * k * bytes_per_weight / us / 1e3}  # fmt: skip


def _timed(fn: Gemv, weights: list, tile: tuple[int, int, int], repeats: int) -> float:
    bn, bk, warps = tile
    t = {"block_n": bn, "block_k": bk, "num_warps": warps}
    return min(time_us(fn, weights, t) for _ in range(repeats))


def _time_bf16(model: str, role: str, x: torch.Tensor, repeats: int) -> dict:
    n, k = SHAPES[model][role][:2]
    bf16 = _weights(n, k, "bf16", max(2, L2_BYTES // (n * k * 2) + 1))
    base, _ = VARIANTS["baseline"].bind(x)
    tile = package_gemv.role_tile(role, bf16[0][0])
    row = _row(model, role, n, k, "bf16", "baseline", tile, _timed(base, bf16, tile, repeats), 2)
    print(f"{model} {role:8s} bf16 {'baseline':24s} {str(tile):16s} {row['us']:8.2f} us "
          f"{row['gb_s']:6.0f} GB/s")  # fmt: skip
    return row


def _time_variant(model, role, kind, variant, x, weights, sweep, repeats, failed) -> list[dict]:
    """The variant at each of its tiles on this projection, each output checked first; the
    rows carry no speed-ups yet."""
    n, k = weights[0][0].shape
    fn, ref_x = variant.bind(x)
    rows = []
    w, s = weights[0]
    for tile in variant.tiles(role, w, sweep):
        try:
            y = fn(w, s, block_n=tile[0], block_k=tile[1], num_warps=tile[2])
            problems = check_output(variant, y, x, ref_x, w, s)
            us = None if problems else _timed(fn, weights, tile, repeats)
        except Exception as e:  # noqa: BLE001 (one variant's failure must not stop the others)
            problems, us = [f"{type(e).__name__}: {str(e).strip()[-600:]}"], None
        if problems:
            print(f"{model} {role} {kind} {variant.name} {tile}: FAILED {problems}")
            failed.add((variant.name, kind))
            break
        rows.append(_row(model, role, n, k, kind, variant.name, tile, us, 1))
    return rows


def bench(models: list[str], names: list[str], kinds: list[str], sweep: bool, repeats: int,
          failed: set[tuple[str, str]], device="cuda",
          rows: list[dict] | None = None) -> list[dict]:  # fmt: skip
    """Every projection: bf16 at the role's tile, then each variant and kind at its tiles, with
    the speed-ups over bf16 and over the package's kernel at the role's tile; appended to
    ``rows`` as they come (returned)."""
    rows = [] if rows is None else rows
    for model in models:
        for role, (n, k, _prologue) in SHAPES[model].items():
            x = random_row(k, torch.bfloat16, device, seed=n + k)
            bf16 = _time_bf16(model, role, x, repeats)
            rows.append(bf16)
            for kind in kinds:
                weights = _weights(n, k, kind, max(2, L2_BYTES // (n * k) + 1))
                package_us = None
                for name in names:
                    if kind not in VARIANTS[name].kinds or (name, kind) in failed:
                        continue
                    timed = _time_variant(model, role, kind, VARIANTS[name], x, weights, sweep,
                                          repeats, failed)  # fmt: skip
                    if name == "baseline" and timed:
                        package_us = timed[0]["us"]  # the package's kernel at the role's tile
                    for row in timed:
                        row["x_bf16"] = bf16["us"] / row["us"]
                        row["x_package"] = package_us / row["us"] if package_us else None
                        print(f"{model} {role:8s} {kind:4s} {name:24s} {str(tuple(row['tile'])):16s} "
                              f"{row['us']:8.2f} us {row['gb_s']:6.0f} GB/s "
                              f"{row['x_bf16']:5.2f}x bf16 "
                              f"{row['x_package'] or float('nan'):5.2f}x package")  # fmt: skip
                    rows.extend(timed)
                del weights
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per model, weight kind and variant: the sum over the layer's four projections of each
    one's best tile, against bf16 and the package's kernel at its tiles (the first rows)."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        roles = list(dict.fromkeys(r["role"] for r in mine))
        bf16 = sum(r["us"] for r in mine if r["weights"] == "bf16")
        for kind in dict.fromkeys(r["weights"] for r in mine if r["weights"] != "bf16"):
            package = {}
            for r in mine:
                if r["weights"] == kind and r["variant"] == "baseline":
                    package.setdefault(r["role"], r["us"])  # the role's tile comes first
            if len(package) < len(roles):
                continue
            for name in dict.fromkeys(r["variant"] for r in mine if r["weights"] == kind):
                best = {}
                for r in mine:
                    if r["weights"] != kind or r["variant"] != name:
                        continue
                    if r["role"] not in best or r["us"] < best[r["role"]]["us"]:
                        best[r["role"]] = r
                if len(best) < len(roles):
                    continue
                total = sum(r["us"] for r in best.values())
                out.append({"model": model, "weights": kind, "variant": name, "layer_us": total,
                            "x_bf16": bf16 / total, "x_package": sum(package.values()) / total,
                            "tiles": {role: r["tile"] for role, r in best.items()}})  # fmt: skip
    return out


# --- SASS of every variant, without a GPU --------------------------------------------------

# Per SM and clock on sm_90 (CUDA C++ Programming Guide, arithmetic instruction throughput,
# compute capability 9.0): 4 schedulers issue 128 thread-instructions; FP32 add/mul/fma 128;
# integer add, logic, shifts, compares, IMAD 64; conversions other than 8/16 -> 32-bit
# integer 16. HADD2.F32 (fp16 -> fp32) is counted as FP32.
ISSUE_PER_CLOCK, RATES = 128, {"fp32": 128, "alu": 64, "conversion": 16}
OP_CLASSES = {
    "conversion": ("I2F", "F2F", "F2I", "F2FP", "I2FP"),
    "fp32": ("FFMA", "FADD", "FMUL", "HADD2", "HFMA2", "HMUL2", "FMNMX", "FSEL"),
    "alu": ("IADD3", "LOP3", "PRMT", "SHF", "SEL", "ISETP", "LEA", "IMAD", "VIADD", "SGXT",
            "IMNMX", "VIADDMNMX", "IABS", "BMSK", "FLO", "POPC"),
}  # fmt: skip
H200_SMS, H200_GHZ, H200_HBM_TB_S = 132, 1.98, 4.8


def _signature(args: dict, constexprs: dict) -> dict:
    return {**args, **dict.fromkeys(constexprs, "constexpr")}


def compile_sass(variant: str, kind: str, tile: tuple[int, int, int], arch: int = 90) -> str:
    """The variant's kernel compiled for ``sm_{arch}`` by this Triton's ptxas, as SASS text."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bn, bk, warps = tile
    w = "*i8" if kind == "int8" else "*fp8e4nv"
    common = {"w_ptr": w, "scale_ptr": "*fp32", "y_ptr": "*bf16", "N": "i32", "K": "i32",
              "stride_wn": "i32"}  # fmt: skip
    options = {"num_warps": warps, "num_stages": NUM_STAGES, "enable_fp_fusion": True}
    if variant == "baseline":
        kernel = package_gemv._gemv_kernel
        consts = {"HAS_SCALE": True, "BLOCK_N": bn, "BLOCK_K": bk, "NUM_STAGES": NUM_STAGES,
                  "PDL": False}  # fmt: skip
        args = {"x_ptr": "*bf16", **common}
        options["enable_fp_fusion"] = False
    elif VARIANTS[variant].tensor_core:
        kernel = _gemv_dot_kernel
        convert_w = variant == "int8_tensor_core"
        x = "*bf16" if convert_w else w  # else x is quantized to the weight's dtype
        consts = {"CONVERT_W": convert_w, "INT_ACC": x == "*i8", "HAS_X_SCALE": not convert_w,
                  "PROMOTE": x == "*fp8e4nv", "PRECISION": "tf32", "BLOCK_N": bn, "BLOCK_K": bk, "DOT_ROWS": DOT_ROWS,
                  "NUM_STAGES": NUM_STAGES}  # fmt: skip
        args = {"x_ptr": x, "x_scale_ptr": "*fp32", **common}
    else:
        kernel = _gemv_convert_kernel
        name = {"convert_fma": "cast"}.get(variant, variant)
        consts = {"CONVERT": name, "BLOCK_N": bn, "BLOCK_K": bk, "NUM_STAGES": NUM_STAGES}
        args = {"x_ptr": "*bf16", **common}
    # As at run time for our shapes: every pointer and integer divisible by 16 (so loads of W
    # are 16-byte vectors); without it the SASS loads bytes one at a time.
    attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in args}
    src = ASTSource(kernel, _signature(args, consts), constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def main_loop(sass: str) -> list[str]:
    """The opcodes of the kernel's main loop: the longest span that a branch jumps back over."""
    lines = [(int(addr, 16), op, rest) for addr, op, rest in _LINE.findall(sass)]
    spans = []
    for addr, op, rest in lines:
        target = re.search(r"0x([0-9a-f]+)", rest)
        if op.startswith("BRA") and target and int(target.group(1), 16) < addr:
            spans.append((int(target.group(1), 16), addr))
    if not spans:
        return []
    start, end = max(spans, key=lambda span: span[1] - span[0])
    return [op for addr, op, _ in lines if start <= addr <= end]


def loop_cost(opcodes: list[str], weights_per_thread: int) -> dict[str, float]:
    """Instructions per weight of one main-loop pass, by class, and the SM clocks per weight
    each class needs at its sm_90 rate; ``clocks`` is the largest (the predicted bound)."""
    per_weight = {"issue": len(opcodes) / weights_per_thread}
    for cls, names in OP_CLASSES.items():
        count = sum(1 for op in opcodes if op.split(".")[0] in names)
        per_weight[cls] = count / weights_per_thread
    clocks = {"issue": per_weight["issue"] / ISSUE_PER_CLOCK}
    clocks |= {cls: per_weight[cls] / rate for cls, rate in RATES.items()}
    bound = max(clocks, key=clocks.get)
    return {**{f"{k}_per_weight": v for k, v in per_weight.items()},
            "clocks_per_weight": clocks[bound], "bound": bound}  # fmt: skip


def print_sass(names: list[str], kinds: list[str], sweep: bool = True) -> list[dict]:
    """Per variant, kind and tile (those timed for the o projection): the main loop's
    instructions per weight by class, and the milliseconds per GB of one-byte weights that
    bound predicts on an H200 (``H200_SMS`` SMs at ``H200_GHZ``) against the HBM's."""
    hbm_ms = 1e3 / (H200_HBM_TB_S * 1e3)
    print(f"main loop per weight; ms per GB predicted on {H200_SMS} SMs at {H200_GHZ} GHz "
          f"(HBM at {H200_HBM_TB_S} TB/s: {hbm_ms:.3f} ms per GB)")  # fmt: skip
    print(f"{'variant':24s} kind {'tile':16s} issue   alu  fp32  conv  bound       ms/GB")
    rows = []
    for name in names:
        for kind in (kd for kd in VARIANTS[name].kinds if kd in kinds):
            weight = torch.empty(1, 1, dtype=WEIGHT_DTYPES[kind])
            for tile in VARIANTS[name].tiles("o", weight, sweep):
                per_thread = tile[0] * tile[1] // (32 * tile[2])
                cost = loop_cost(main_loop(compile_sass(name, kind, tile)), per_thread)
                ms_per_gb = cost["clocks_per_weight"] * 1e9 / (H200_SMS * H200_GHZ * 1e9) * 1e3
                rows.append({"variant": name, "weights": kind, "tile": list(tile), **cost,
                             "predicted_ms_per_gb": ms_per_gb})  # fmt: skip
                print(f"{name:24s} {kind:4s} {str(tile):16s} {cost['issue_per_weight']:5.2f} "
                      f"{cost['alu_per_weight']:5.2f} {cost['fp32_per_weight']:5.2f} "
                      f"{cost['conversion_per_weight']:5.2f}  {cost['bound']:10s} "
                      f"{ms_per_gb:6.3f}")  # fmt: skip
    return rows


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_Formatter)
    parser.add_argument("--models", type=comma_list(list(SHAPES)), default=",".join(SHAPES),
                        help="comma-separated layer shapes (Llama-3.1-8B, Llama-3.2-1B)")  # fmt: skip
    parser.add_argument("--variants", type=comma_list(list(VARIANTS)), default=",".join(VARIANTS),
                        help="comma-separated variants to check and time")  # fmt: skip
    parser.add_argument("--kinds", type=comma_list(list(KINDS)), default=",".join(KINDS),
                        help="comma-separated weight kinds")  # fmt: skip
    parser.add_argument("--no-sweep", action="store_true",
                        help="time (or with --sass compile) each variant at its first tile only "
                             "(the role's package tile; tensor-core variants: the first of "
                             "DOT_TILES)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3,
                        help="timings per configuration (each a graph replayed 20 times); the "
                             "fastest is kept")  # fmt: skip
    parser.add_argument("--sass", action="store_true",
                        help="no GPU: compile every variant for sm_90 and count the SASS "
                             "instructions doing the per-weight work, then exit")  # fmt: skip
    parser.add_argument("--out", default=None, help="write the rows and summary as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.sass:
        rows = print_sass(args.variants, args.kinds, not args.no_sweep)
        if args.out:
            Path(args.out).write_text(json.dumps({"sass": rows}, indent=1))
        return 0
    if not torch.cuda.is_available():
        sys.exit("quant_gemv_variants.py needs a CUDA GPU (or --sass, which needs none)")
    kinds = args.kinds
    if "fp8" in kinds and torch.cuda.get_device_capability() < (8, 9):
        print("fp8 needs compute capability 8.9 or later: timing int8 only")
        kinds = [kd for kd in kinds if kd != "fp8"]
    device_name = torch.cuda.get_device_name()
    print(device_name, "torch", torch.__version__, "triton", triton.__version__)
    failed = run_checks(args.variants, kinds, DEVICE)
    rows: list[dict] = []
    try:
        bench(args.models, args.variants, kinds, not args.no_sweep, args.repeats, failed, DEVICE,
              rows=rows)  # fmt: skip
    finally:  # what was timed is reported even if a later projection dies (out of memory, say)
        summary = summarize(rows)
        if args.out:
            Path(args.out).write_text(json.dumps({"device": device_name, "failed": sorted(failed),
                                                  "rows": rows, "summary": summary}, indent=1))  # fmt: skip
        print("\nlayer (qkv + o + gate_up + down, plain GEMVs, best tile each):")
        for s in summary:
            print(f"{s['model']} {s['weights']:4s} {s['variant']:24s} {s['layer_us']:8.1f} us "
                  f"{s['x_bf16']:5.2f}x bf16 {s['x_package']:5.2f}x package")  # fmt: skip
        if failed:
            print(f"FAILED checks (not timed): {sorted(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
