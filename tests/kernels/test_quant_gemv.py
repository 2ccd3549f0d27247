"""The one-row GEMVs and the few-rows weight-only GEMM reading quantized weights (int8,
float8_e4m3fn) with per-row scales, against their PyTorch twins and against the dequantized
float weight; the per-token fp8 activation quantization, bit for bit against PyTorch's.

Without CUDA the kernels run under the Triton interpreter (see ``triton_interpreter``), which
reads both int8 and e4m3; its ``tl.dot`` has no bfloat16, so the GEMM's bf16 runs are GPU tests.
"""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import check_interpreter_suite, kernel_modes  # before triton

triton = pytest.importorskip("triton")

from parallm.kernels import gemv as fused_gemv  # noqa: E402
from parallm.kernels.gemv import gemv, rms_norm_gemv, silu_mul_gemv  # noqa: E402
from parallm.kernels.quant_gemv import MAX_ROWS, per_token_fp8, weight_only_gemm  # noqa: E402
from parallm.kernels.reference import gemv_ref, rms_norm_gemv_ref, silu_mul_gemv_ref  # noqa: E402
from parallm.layers.quantization import WEIGHT_FORMATS  # noqa: E402
from parallm.layers.quantization.fp8 import quantize_fp8_per_token  # noqa: E402

INTERPRETING, interpreter_test, requires_cuda = kernel_modes(fused_gemv._gemv_kernel)
EPS = 1e-5
METHODS = list(WEIGHT_FORMATS)
SMALL_TILE = {"block_n": 16, "block_k": 32}
# The kernel and its twin both sum in float32 and scale once per row; they differ only in the
# order of the sums (and one rounding to the activations' dtype on 16-bit outputs).
TWIN_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _quantized(n, k, method, device, seed):
    """``(q, scale, w)``: a random [n, k] weight whose rows span two decades, quantized."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5 * torch.logspace(-1, 1, n)[:, None]
    q, scale = WEIGHT_FORMATS[method].quantize(w)
    return q.to(device), scale.to(device), w.to(device)


def _dequantized(q, scale, dtype):
    return (q.float() * scale[:, None]).to(dtype)


def check_gemv(n, k, method, dtype, device, **cfg):
    q, scale, _ = _quantized(n, k, method, device, seed=n + k)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(k)).to(dtype).to(device)
    y = gemv(x, q, weight_scale=scale, **cfg)
    assert y.shape == (1, n) and y.dtype == dtype
    assert _rel(y, gemv_ref(x, q, scale)) < TWIN_TOL[dtype]
    # The same product as the float GEMV over the dequantized weight (float32 there).
    want = gemv_ref(x.float(), _dequantized(q, scale, torch.float32))
    assert _rel(y, want) < TWIN_TOL[dtype]
    # A scale per row, not one for all: a wrong scale is an error of order one.
    assert _rel(gemv_ref(x, q, scale.flip(0)), want) > 0.5


def check_norm(n, k, method, dtype, device, residual, **cfg):
    q, scale, _ = _quantized(n, k, method, device, seed=2 * n + k)
    g = torch.Generator().manual_seed(n * k)
    x = torch.randn(1, k, generator=g).to(dtype).to(device)
    res = torch.randn(1, k, generator=g).to(dtype).to(device) if residual else None
    norm_w = (1 + 0.1 * torch.randn(k, generator=g)).to(dtype).to(device)
    y, summed = rms_norm_gemv(x, res, norm_w, q, EPS, weight_scale=scale, **cfg)
    ref, ref_summed = rms_norm_gemv_ref(x, res, norm_w, q, EPS, weight_scale=scale)
    assert y.shape == (1, n) and y.dtype == dtype
    assert _rel(y, ref) < TWIN_TOL[dtype]
    if residual:
        assert torch.equal(summed, ref_summed)
    float_y, _ = rms_norm_gemv_ref(x, res, norm_w, _dequantized(q, scale, dtype), EPS)
    assert _rel(y, float_y) < 2 * TWIN_TOL[dtype]


def check_gather(n, k, method, dtype, device, **cfg):
    q, scale, _ = _quantized(n, k, method, device, seed=3 * n + k)
    g = torch.Generator().manual_seed(n + 5 * k)
    table = torch.randn(50, k, generator=g).to(dtype).to(device)
    norm_w = (1 + 0.1 * torch.randn(k, generator=g)).to(dtype).to(device)
    ids = torch.tensor([21], device=device)
    y, row = rms_norm_gemv(table, None, norm_w, q, EPS, gather_ids=ids, weight_scale=scale, **cfg)
    ref, ref_row = rms_norm_gemv_ref(table, None, norm_w, q, EPS, gather_ids=ids,
                                     weight_scale=scale)  # fmt: skip
    assert _rel(y, ref) < TWIN_TOL[dtype] and torch.equal(row, ref_row)


def check_silu(n, k, method, dtype, device, **cfg):
    q, scale, _ = _quantized(n, k, method, device, seed=n + 7 * k)
    gate_up = torch.randn(1, 2 * k, generator=torch.Generator().manual_seed(k)).to(dtype)
    gate_up = gate_up.to(device)
    y = silu_mul_gemv(gate_up, q, weight_scale=scale, **cfg)
    assert y.shape == (1, n) and y.dtype == dtype
    assert _rel(y, silu_mul_gemv_ref(gate_up, q, scale)) < TWIN_TOL[dtype]
    float_y = silu_mul_gemv_ref(gate_up, _dequantized(q, scale, dtype))
    assert _rel(y, float_y) < 2 * TWIN_TOL[dtype]


def check_gemm(m, n, k, method, dtype, device, **cfg):
    q, scale, _ = _quantized(n, k, method, device, seed=m + n + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m * k)).to(dtype).to(device)
    y = weight_only_gemm(x, q, scale, **cfg)
    assert y.shape == (m, n) and y.dtype == dtype
    assert _rel(y, gemv_ref(x, q, scale)) < TWIN_TOL[dtype]
    want = gemv_ref(x.float(), _dequantized(q, scale, torch.float32))
    assert _rel(y, want) < TWIN_TOL[dtype]
    # Every row is its own GEMV: row i alone gives row i (no mixing across rows or tiles).
    for i in {0, m // 2, m - 1}:
        assert _rel(y[i : i + 1], gemv_ref(x[i : i + 1], q, scale)) < TWIN_TOL[dtype]


def check_per_token(m, k, dtype, device):
    """Rows spanning magnitudes (a zero row, a tiny one, outliers past 448): the same bits and
    scales as the PyTorch quantizer."""
    g = torch.Generator().manual_seed(m + k)
    spread = torch.logspace(-9, 4, m)[torch.randperm(m, generator=g)]
    x = torch.randn(m, k, generator=g) * spread[:, None]
    x[0] = 0.0
    x[-1, k // 2] = 3e3
    x = x.clamp(-6e4, 6e4).to(dtype).to(device)
    q, scale = per_token_fp8(x)
    want_q, want_scale = quantize_fp8_per_token(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (m, 1)
    assert torch.equal(scale, want_scale)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))


def test_interpreter_suite_in_subprocess():
    """The interpreter tests run: here when triton was imported in interpreter mode, else in a
    subprocess that sets TRITON_INTERPRET before triton's first import."""
    check_interpreter_suite(__file__, INTERPRETING)


ALL_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@triton.jit
def _weights_as_kernel(q_ptr, y_ptr, DTYPE: triton.language.constexpr):
    offs = triton.language.arange(0, 256)
    triton.language.store(y_ptr + offs, fused_gemv.weights_as(triton.language.load(q_ptr + offs),
                                                              DTYPE))  # fmt: skip


def check_weights_as_every_int8(dtype: torch.dtype, device: str) -> None:
    """The GEMVs' int8 conversion (an integer add and a float subtract, no conversion
    instruction) gives every int8 value exactly, in every activation dtype."""
    q = torch.arange(-128, 128, dtype=torch.int8, device=device)
    y = torch.empty(256, dtype=dtype, device=device)
    tl_dtype = {torch.float32: triton.language.float32, torch.bfloat16: triton.language.bfloat16,
                torch.float16: triton.language.float16}[dtype]  # fmt: skip
    _weights_as_kernel[(1,)](q, y, DTYPE=tl_dtype)
    assert torch.equal(y.cpu(), q.cpu().to(dtype))


@interpreter_test
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_int8_weights_convert_exactly_interpreter(dtype):
    check_weights_as_every_int8(dtype, "cpu")


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_int8_weights_convert_exactly_cuda(dtype):
    check_weights_as_every_int8(dtype, "cuda")


@interpreter_test
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize(("n", "k"), [(48, 64), (40, 96)])
def test_quantized_gemv_interpreter(n, k, dtype, method):
    check_gemv(n, k, method, dtype, "cpu", **SMALL_TILE)


@interpreter_test
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("residual", [False, True])
def test_quantized_norm_gemv_interpreter(method, dtype, residual):
    check_norm(40, 96, method, dtype, "cpu", residual, **SMALL_TILE)


@interpreter_test
@pytest.mark.parametrize("method", METHODS)
def test_quantized_norm_gemv_gathers_its_row_interpreter(method):
    check_gather(48, 64, method, torch.float32, "cpu", **SMALL_TILE)


@interpreter_test
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_quantized_silu_gemv_interpreter(method, dtype):
    check_silu(40, 96, method, dtype, "cpu", **SMALL_TILE)


@interpreter_test
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 48, 64), (3, 40, 200), (17, 70, 130), (64, 33, 96)])
def test_weight_only_gemm_interpreter(m, n, k, method, dtype):
    check_gemm(m, n, k, method, dtype, "cpu", block_n=32)


@interpreter_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("m", "k"), [(1, 64), (9, 300), (33, 1024)])
def test_per_token_fp8_interpreter(m, k, dtype):
    check_per_token(m, k, dtype, "cpu")


def test_weight_only_gemm_refuses_what_it_does_not_compute():
    q, scale, _ = _quantized(8, 16, "int8", "cpu", seed=0)
    with pytest.raises(ValueError, match=rf"1 <= M <= {MAX_ROWS}"):
        weight_only_gemm(torch.zeros(MAX_ROWS + 1, 16), q, scale)
    with pytest.raises(ValueError, match=r"weight must be \[N, 32\]"):
        weight_only_gemm(torch.zeros(2, 32), q, scale)
    with pytest.raises(ValueError, match=r"weight_scale must be float32 \[8\]"):
        weight_only_gemm(torch.zeros(2, 16), q, scale.half())


@pytest.mark.parametrize("method", METHODS)
def test_a_quantized_weight_needs_its_per_row_scales(method):
    q, scale, _ = _quantized(8, 16, method, "cpu", seed=0)
    x = torch.zeros(1, 16)
    with pytest.raises(ValueError, match="weight_scale is needed"):
        gemv(x, q)
    with pytest.raises(ValueError, match=r"weight_scale must be contiguous float32 \[8\]"):
        gemv(x, q, weight_scale=scale[:4])
    with pytest.raises(ValueError, match="weight_scale must be contiguous float32"):
        silu_mul_gemv(torch.zeros(1, 32), q, weight_scale=scale.double())
    with pytest.raises(ValueError, match="weight_scale must be contiguous float32"):
        rms_norm_gemv(x, None, torch.ones(16), q, EPS, weight_scale=scale.view(8, 1))


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_one_byte_weights_get_their_own_tiles(dtype):
    """Every role has a one-byte tile (what the GEMVs launch with by default) that fits the
    shared-memory budget as it is, and 16-bit weights keep theirs."""
    w8 = torch.empty(2048, 8192, dtype=dtype)
    w16 = torch.empty(2048, 8192, dtype=torch.bfloat16)
    byte_tiles = {"qkv": fused_gemv.QKV_TILE_1B, "gate_up": fused_gemv.GATE_UP_TILE_1B,
                  "down": fused_gemv.DOWN_TILE_1B, "o": fused_gemv.O_TILE_1B}  # fmt: skip
    for role, tile in byte_tiles.items():
        assert fused_gemv._tile(role, None, None, None, w8, 3) == tile
        assert 3 * tile[0] * tile[1] <= fused_gemv._SMEM_BUDGET
        assert fused_gemv._tile(role, None, None, None, w16, 3) != tile


CUDA_DTYPES = [torch.bfloat16, torch.float16]


def on_cuda_over_formats(test):
    """A GPU test over every weight format and 16-bit activation dtype."""
    for mark in (pytest.mark.parametrize("dtype", CUDA_DTYPES),
                 pytest.mark.parametrize("method", METHODS), requires_cuda, pytest.mark.gpu):  # fmt: skip
        test = mark(test)
    return test


@on_cuda_over_formats
@pytest.mark.parametrize(("n", "k"), [(2048, 2048), (4096, 4096), (128256, 2048), (1000, 3000)])
def test_quantized_gemv_cuda(n, k, method, dtype):
    _skip_without_fp8(method)
    check_gemv(n, k, method, dtype, "cuda")


@on_cuda_over_formats
@pytest.mark.parametrize(("n", "k"), [(3072, 2048), (28672, 4096), (6144, 4096), (2000, 1000)])
def test_quantized_norm_gemv_cuda(n, k, method, dtype):
    _skip_without_fp8(method)
    check_norm(n, k, method, dtype, "cuda", True)
    check_norm(n, k, method, dtype, "cuda", False)
    check_gather(n, k, method, dtype, "cuda")


@on_cuda_over_formats
@pytest.mark.parametrize(("n", "k"), [(2048, 8192), (4096, 14336), (1000, 3000)])
def test_quantized_silu_gemv_cuda(n, k, method, dtype):
    _skip_without_fp8(method)
    check_silu(n, k, method, dtype, "cuda")


def _skip_without_fp8(method: str) -> None:
    if method == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("Triton converts e4m3 on compute capability 8.9 and later")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [*CUDA_DTYPES, torch.float32])
@pytest.mark.parametrize("m", [2, 7, 16, 33, 64])
@pytest.mark.parametrize(("n", "k"), [(6144, 4096), (4096, 14336), (28672, 4096), (1000, 3000)])
def test_weight_only_gemm_cuda(m, n, k, method, dtype):
    _skip_without_fp8(method)
    check_gemm(m, n, k, method, dtype, "cuda")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [*CUDA_DTYPES, torch.float32])
@pytest.mark.parametrize(("m", "k"), [(1, 4096), (7, 2048), (4096, 4096), (256, 14336), (3, 100)])
def test_per_token_fp8_cuda(m, k, dtype):
    check_per_token(m, k, dtype, "cuda")
