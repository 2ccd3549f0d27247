"""Fused RMSNorm->GEMV, SiLU-mul->GEMV and the plain GEMV against their PyTorch twins.

Without CUDA the kernels run under the Triton interpreter (see ``triton_interpreter``).
"""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import check_interpreter_suite, kernel_modes  # before triton

triton = pytest.importorskip("triton")

from parallm.kernels import gemv as fused_gemv  # noqa: E402
from parallm.kernels import pdl  # noqa: E402
from parallm.kernels.gemv import gemv, rms_norm_gemv, silu_mul_gemv  # noqa: E402
from parallm.kernels.reference import gemv_ref, rms_norm_gemv_ref, silu_mul_gemv_ref  # noqa: E402

INTERPRETING, interpreter_test, requires_cuda = kernel_modes(fused_gemv._norm_gemv_kernel)
EPS = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def check_norm(n, k, dtype, device, residual, tol, **cfg):
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(1, k, generator=g).to(dtype).to(device)
    res = torch.randn(1, k, generator=g).to(dtype).to(device) if residual else None
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype).to(device)
    norm_w = (1 + 0.1 * torch.randn(k, generator=g)).to(dtype).to(device)
    ref, ref_res = rms_norm_gemv_ref(x, res, norm_w, w, EPS)
    y, new_res = rms_norm_gemv(x, res, norm_w, w, EPS, **cfg)
    assert y.shape == (1, n) and y.dtype == dtype
    assert _rel(y, ref) < tol
    if residual:
        assert torch.equal(new_res, ref_res)  # the summed residual is exact
    else:
        assert new_res is None and ref_res is None


def check_silu(n, k, dtype, device, tol, **cfg):
    g = torch.Generator().manual_seed(n * k)
    gate_up = torch.randn(1, 2 * k, generator=g).to(dtype).to(device)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype).to(device)
    y = silu_mul_gemv(gate_up, w, **cfg)
    assert y.shape == (1, n) and y.dtype == dtype
    assert _rel(y, silu_mul_gemv_ref(gate_up, w)) < tol


def check_gemv(n, k, dtype, device, tol, **cfg):
    g = torch.Generator().manual_seed(3 * n + k)
    x = torch.randn(1, k, generator=g).to(dtype).to(device)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype).to(device)
    y = gemv(x, w, **cfg)
    assert y.shape == (1, n) and y.dtype == dtype
    assert _rel(y, gemv_ref(x, w)) < tol


def test_interpreter_suite_in_subprocess():
    """The interpreter tests run: here when triton was imported in interpreter mode, else in a
    subprocess that sets TRITON_INTERPRET before triton's first import."""
    check_interpreter_suite(__file__, INTERPRETING)


@interpreter_test
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize(("n", "k"), [(48, 64), (40, 96)])
def test_norm_gemv_interpreter(n, k, residual):
    check_norm(n, k, torch.float32, "cpu", residual, 1e-5, block_n=16, block_k=32)


@interpreter_test
@pytest.mark.parametrize(("n", "k"), [(48, 64), (40, 96)])
def test_silu_gemv_interpreter(n, k):
    check_silu(n, k, torch.float32, "cpu", 1e-5, block_n=16, block_k=32)


@interpreter_test
@pytest.mark.parametrize(("n", "k"), [(48, 64), (40, 96), (24, 16)])
def test_gemv_interpreter(n, k):
    check_gemv(n, k, torch.float32, "cpu", 1e-5, block_n=16, block_k=32)


def check_gather(n, k, dtype, device, tol, **cfg):
    """The row is read from a table by the kernel itself: the same output, bit for bit, as
    the plain call on that row (and the twin's within ``tol``), and the row itself returned
    as the residual."""
    g = torch.Generator().manual_seed(n + 3 * k)
    table = torch.randn(50, k, generator=g).to(dtype).to(device)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype).to(device)
    norm_w = (1 + 0.1 * torch.randn(k, generator=g)).to(dtype).to(device)
    ids = torch.tensor([37], device=device)
    y, row = rms_norm_gemv(table, None, norm_w, w, EPS, gather_ids=ids, **cfg)
    want, _ = rms_norm_gemv(table[37:38].clone(), None, norm_w, w, EPS, **cfg)
    assert torch.equal(y, want) and torch.equal(row, table[37:38])
    ref, ref_row = rms_norm_gemv_ref(table, None, norm_w, w, EPS, gather_ids=ids)
    assert _rel(y, ref) < tol and torch.equal(ref_row, row)
    with pytest.raises(ValueError, match="residual None"):
        rms_norm_gemv(table, row, norm_w, w, EPS, gather_ids=ids)
    with pytest.raises(ValueError, match="one integer id"):
        rms_norm_gemv(table, None, norm_w, w, EPS, gather_ids=ids.float())


@interpreter_test
def test_norm_gemv_gathers_its_row_interpreter():
    check_gather(48, 64, torch.float32, "cpu", 1e-5, block_n=16, block_k=32)


def test_pdl_only_when_asked_and_on_cuda():
    cpu = torch.zeros(1)
    assert pdl.pdl_launch(cpu, False) == {"PDL": 0}
    assert pdl.pdl_launch(cpu, True) == {"PDL": 0}  # never on CPU or the interpreter


def test_rejects_batches():
    with pytest.raises(ValueError, match=r"one contiguous row \[1, K\]"):
        rms_norm_gemv(torch.zeros(2, 8), None, torch.ones(8), torch.zeros(4, 8), EPS)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("n", "k"), [(3072, 2048), (16384, 2048), (2000, 1000)])
def test_norm_gemv_cuda(n, k, dtype):
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    check_norm(n, k, dtype, "cuda", True, tol)
    check_norm(n, k, dtype, "cuda", False, tol)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_norm_gemv_gathers_its_row_cuda(dtype):
    check_gather(3072, 2048, dtype, "cuda", 1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("n", "k"), [(2048, 8192), (1000, 3000)])
def test_silu_gemv_cuda(n, k, dtype):
    check_silu(n, k, dtype, "cuda", 1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("n", "k"), [(2048, 2048), (128256, 2048), (1000, 3000)])
def test_gemv_cuda(n, k, dtype):
    check_gemv(n, k, dtype, "cuda", 1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.gpu
@requires_cuda
def test_pdl_chain_in_a_graph_equals_separate_launches():
    """norm-GEMV -> GEMV -> norm-GEMV -> SiLU-GEMV launched with PDL inside a CUDA graph, on
    fresh inputs each replay, against the same chain launched without PDL."""
    k, inter = 1024, 3072
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(7)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=dev, dtype=torch.float32).to(dt) * scale

    w_in, w_o = rand(k, k, scale=k**-0.5), rand(k, k, scale=k**-0.5)
    w_up, w_down = rand(2 * inter, k, scale=k**-0.5), rand(k, inter, scale=inter**-0.5)
    n1, n2 = 1 + 0.1 * rand(k), 1 + 0.1 * rand(k)
    x, res = rand(1, k), rand(1, k)

    def chain(on: bool):
        h, r = rms_norm_gemv(x, res, n1, w_in, EPS, pdl=on)
        h = gemv(h, w_o, pdl=on)
        gu, r = rms_norm_gemv(h, r, n2, w_up, EPS, pdl=on)
        return silu_mul_gemv(gu, w_down, pdl=on), r

    assert bool(pdl.pdl_launch(x, True)["PDL"]) == (
        pdl._SUPPORTED and torch.cuda.get_device_capability()[0] >= 9
    )
    chain(True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, out_res = chain(True)
    for _ in range(3):
        x.copy_(rand(1, k))
        res.copy_(rand(1, k))
        graph.replay()
        ref, ref_res = chain(False)  # plain launches
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        torch.testing.assert_close(out_res, ref_res, rtol=0, atol=0)


def test_default_tiles_fit_shared_memory():
    """Default tiles are sized for 16-bit weights: float32 ones get a narrower block_k, so the
    W pipeline stages stay within shared memory; explicit tiles are kept as given."""
    from parallm.kernels import gemv as fused_gemv

    w16, w32 = torch.empty(2048, 8192, dtype=torch.bfloat16), torch.empty(2048, 8192)
    n, k, warps = fused_gemv.DOWN_TILE
    assert fused_gemv._tile("down", None, None, None, w16, 3) == (n, k, warps)
    bn, bk, _ = fused_gemv._tile("down", None, None, None, w32, 3)
    assert 3 * bn * bk * 4 <= fused_gemv._SMEM_BUDGET < 3 * bn * 2 * bk * 4
    assert fused_gemv._tile("down", 8, 4096, 4, w32, 3) == (8, 4096, 4)
    with pytest.raises(ValueError, match="role must be one of qkv, gate_up, down, o, lm_head"):
        fused_gemv._tile("up", None, None, None, w16, 3)
