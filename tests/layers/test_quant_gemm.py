"""The quantized layers' GEMM paths (``WeightFormat.linear``) against the dequantize reference:
int8 through ``torch._weight_int8pack_mm`` on CPU, fp8 through ``torch._scaled_mm`` with
per-token fp8 activations (checked on CPU, whose torch runs it too, and on CUDA where the
layers take it), one-row and few-row calls on CUDA through the Triton kernels that read the
quantized weight, and which path each call takes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from parallm.layers.linear import ColumnParallelLinear
from parallm.layers.quantization import WEIGHT_FORMATS
from parallm.layers.quantization import fp8 as fp8_module
from parallm.layers.quantization import int8 as int8_module
from parallm.layers.quantization.format import dequantized_linear
from parallm.layers.quantization.fp8 import (
    FP8_MAX,
    quantize_fp8_per_token,
    scaled_mm_linear,
)
from parallm.layers.quantization.int8 import INT8PACK_MAX_ROWS, int8pack_linear
from parallm.layers.quantization.linear import quantize_linear

# A bf16 result is rounded once (2**-9 relative); the int8pack path also rounds each row's
# scale to bf16 (another 2**-9, systematic per column), the reference each weight.
BF16_REL = 4 * 2.0**-9


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _case(m, n, k, method, dtype, seed=0, device="cpu", bias=False):
    """``(x, q, scale, b, want)``: want = x @ dequantized(W)^T + b, computed in float32."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5 * torch.logspace(-1, 1, n)[:, None]
    b = torch.randn(n, generator=g) if bias else None
    q, scale = WEIGHT_FORMATS[method].quantize(w)
    want = F.linear(x, WEIGHT_FORMATS[method].dequantize(q, scale, torch.float32), b)
    x, q, scale = x.to(dtype).to(device), q.to(device), scale.to(device)
    b = b.to(dtype).to(device) if bias else None
    return x, q, scale, b, want.to(device)


# --- int8: torch._weight_int8pack_mm on CPU -------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int8pack_matches_the_dequantize_reference(dtype, bias):
    x, q, scale, b, want = _case(7, 48, 96, "int8", dtype, seed=1, bias=bias)
    got = int8pack_linear(x, q, scale, b)
    assert got.dtype == dtype and got.shape == (7, 48)
    tol = 1e-6 if dtype == torch.float32 else BF16_REL if dtype == torch.bfloat16 else 2e-3
    assert _rel(got, want) < tol
    assert _rel(got, dequantized_linear(x, q, scale, b)) < tol
    # Leading dimensions are kept (x [B, S, K]).
    assert int8pack_linear(x.view(1, 7, 96), q, scale, b).shape == (1, 7, 48)


def test_int8_layers_on_cpu_take_int8pack_for_few_bf16_rows(monkeypatch):
    calls = []
    real = int8_module.int8pack_linear
    monkeypatch.setattr(int8_module, "int8pack_linear",
                        lambda *a: calls.append(a[0].shape) or real(*a))  # fmt: skip
    layer = ColumnParallelLinear(96, 48).to(torch.bfloat16)
    quantize_linear(layer, WEIGHT_FORMATS["int8"])
    for rows in (1, INT8PACK_MAX_ROWS, INT8PACK_MAX_ROWS + 1):
        layer(torch.randn(rows, 96, dtype=torch.bfloat16))
    layer.float()(torch.randn(1, 96))  # float32 activations dequantize
    assert calls == [(1, 96), (INT8PACK_MAX_ROWS, 96)]


# --- fp8: per-token activations and torch._scaled_mm ----------------------------------------


def test_per_token_fp8_activations_scale_each_row_onto_the_e4m3_range():
    x = torch.randn(5, 64) * torch.tensor([1e-3, 1.0, 30.0, 0.0, 1e4])[:, None]
    xq, scale = quantize_fp8_per_token(x)
    assert xq.dtype == torch.float8_e4m3fn and scale.shape == (5, 1)
    assert scale.dtype == torch.float32
    peaks = xq.float().abs().amax(dim=1)
    assert (peaks[[0, 1, 2, 4]] == FP8_MAX).all() and peaks[3] == 0
    err = (xq.float() * scale - x).abs()
    assert (err <= 2.0**-4 * x.abs() + 2.0**-10 * scale).all()


def _emulated_scaled_mm(x, q, scale, b):
    """What ``scaled_mm_linear`` computes: per-token e4m3 x, float32 products, bf16 out."""
    xq, x_scale = quantize_fp8_per_token(x.float())
    y = (xq.float() * x_scale) @ (q.float() * scale[:, None]).T
    y = y.to(torch.bfloat16).to(x.dtype)
    return y if b is None else y + b


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scaled_mm_path_is_per_token_fp8_times_per_channel_fp8(dtype, bias):
    """On CPU torch runs ``_scaled_mm`` as well: the path's exact arithmetic (up to float32
    summation order and one bf16 rounding) and its error against the weight-only reference,
    which the activations' e4m3 rounding (2**-4 relative at most, about 2% RMS) dominates."""
    x, q, scale, b, want = _case(9, 64, 128, "fp8", dtype, seed=2, bias=bias)
    try:
        got = scaled_mm_linear(x, q, scale, b)
    except (RuntimeError, NotImplementedError) as e:  # a torch without CPU fp8 GEMMs
        pytest.skip(f"torch._scaled_mm on CPU: {e}")
    assert got.dtype == dtype and got.shape == (9, 64)
    assert _rel(got, _emulated_scaled_mm(x, q, scale, b)) < BF16_REL
    rel = _rel(got, want)
    assert 0.002 < rel < 0.05, rel  # really quantizes the activations, and only to e4m3


def test_fp8_layers_dequantize_off_fp8_gpus():
    """On CPU (and GPUs before compute capability 8.9, and for float32 activations) the fp8
    GEMM is the dequantize reference, bit for bit."""
    for dtype in (torch.float32, torch.bfloat16):
        x, q, scale, b, _ = _case(4, 32, 64, "fp8", dtype, seed=3, bias=True)
        assert torch.equal(fp8_module.fp8_linear(x, q, scale, b),
                           dequantized_linear(x, q, scale, b))  # fmt: skip


# --- CUDA -----------------------------------------------------------------------------------


def _cuda_capability() -> tuple[int, int]:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("m", "n", "k"), [(2, 2048, 2048), (64, 6144, 4096), (300, 4096, 14336)])
def test_fp8_layers_on_cuda_use_scaled_mm(m, n, k, dtype, bias, monkeypatch):
    if _cuda_capability() < (8, 9):
        pytest.skip("fp8 tensor cores need compute capability 8.9")
    calls = []
    real = fp8_module.scaled_mm_linear
    monkeypatch.setattr(fp8_module, "scaled_mm_linear", lambda *a: calls.append(1) or real(*a))
    x, q, scale, b, want = _case(m, n, k, "fp8", dtype, seed=4, device="cuda", bias=bias)
    got = fp8_module.fp8_linear(x, q, scale, b)
    assert calls == [1] and got.dtype == dtype
    assert _rel(got, _emulated_scaled_mm(x, q, scale, b)) < 2 * BF16_REL
    assert _rel(got, want) < 0.05


@pytest.mark.gpu
@pytest.mark.parametrize("method", list(WEIGHT_FORMATS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_one_row_calls_on_cuda_read_the_quantized_weight(method, dtype, monkeypatch):
    """A one-row call (batch-1 decode outside the chain) runs the Triton GEMV: weight-only, so
    as close to the reference as the 16-bit output allows; more rows take the GEMMs."""
    if method == "fp8" and _cuda_capability() < (8, 9):
        pytest.skip("Triton converts e4m3 on compute capability 8.9 and later")
    from parallm.kernels import gemv

    calls = []
    real = gemv.gemv
    monkeypatch.setattr(gemv, "gemv", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    fmt = WEIGHT_FORMATS[method]
    x, q, scale, b, want = _case(1, 4096, 4096, method, dtype, seed=5, device="cuda", bias=True)
    got = fmt.linear(x.view(1, 1, -1), q, scale, b)
    assert calls == [1] and got.shape == (1, 1, 4096)
    assert _rel(got.view(1, -1), want) < 2 * BF16_REL
    fmt.linear(torch.cat([x, x]), q, scale, b)
    assert calls == [1]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_decode_batches_on_cuda_read_the_int8_weight(dtype, monkeypatch):
    """2..MAX_ROWS rows take the few-rows Triton GEMM (weight-only), more rows dequantize."""
    from parallm.kernels import quant_gemv

    calls = []
    real = quant_gemv.weight_only_gemm
    monkeypatch.setattr(quant_gemv, "weight_only_gemm",
                        lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))  # fmt: skip
    for rows in (2, quant_gemv.MAX_ROWS, quant_gemv.MAX_ROWS + 1):
        x, q, scale, b, want = _case(rows, 4096, 4096, "int8", dtype, seed=6, device="cuda",
                                     bias=True)  # fmt: skip
        got = WEIGHT_FORMATS["int8"].linear(x, q, scale, b)
        assert got.dtype == dtype and _rel(got, want) < 2 * BF16_REL
    assert calls == [2, quant_gemv.MAX_ROWS]
    empty = WEIGHT_FORMATS["int8"].linear(x[:0], q, scale, b)  # a step with no rows
    assert empty.shape == (0, 4096) and calls == [2, quant_gemv.MAX_ROWS]
