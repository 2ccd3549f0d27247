"""The skinny GEMM (``skinny_linear``) against F.linear in float64.

Bounds: every output is within one rounding of its dtype (``u``) of the exact value, plus a
small multiple of ``|x| @ |W|^T (+ |b|)`` for the float32 accumulation order; and the whole
output is within ``u`` relative error in norm (rounding alone gives about u / 2.5; float32
gets 1e-5, as its accumulation order dominates there).

Without CUDA the kernels run under the Triton interpreter on small shapes (see
``triton_interpreter``); the GPU tests cover the Llama-3.2-1B and Llama-3.1-8B projections.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import (  # before triton: sets the interpreter
    check_interpreter_suite,
    kernel_modes,
)

triton = pytest.importorskip("triton")

from parallm.layers import skinny_gemm  # noqa: E402
from parallm.layers.skinny_gemm import (  # noqa: E402
    SkinnyConfig,
    candidate_configs,
    skinny_config,
    skinny_linear,
)

INTERPRETING, interpreter_test, requires_cuda = kernel_modes(skinny_gemm._skinny_gemm_kernel)

# Unit roundoff of the output dtype (round to nearest). The interpreter's float32 -> bfloat16
# cast truncates, which costs up to a whole ulp: 2**-7.
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
INTERPRETER_BF16_U = 2.0**-7
HALF_DTYPES = [torch.bfloat16, torch.float16]
ACC_TOL = 2.0**-16  # float32 accumulation, relative to |x| @ |W|^T (+ |b|)

# (N, K) of the decode GEMMs: fused q/k/v, o_proj, fused gate/up, down_proj, LM head.
SHAPES = {
    "1b-qkv": (3072, 2048),
    "1b-o": (2048, 2048),
    "1b-gate_up": (16384, 2048),
    "1b-down": (2048, 8192),
    "1b-lm_head": (128256, 2048),
    "8b-qkv": (6144, 4096),
    "8b-o": (4096, 4096),
    "8b-gate_up": (28672, 4096),
    "8b-down": (4096, 14336),
    "8b-lm_head": (128256, 4096),
}

# Interpreter configurations: each path with and without split-K. On (40, 256) the splits
# are whole BLOCK_K steps (no K mask); on (50, 200) and (72, 136) they are not, and K=136
# drops a split that would start past K.
CONFIGS = {
    "fma-deferred": SkinnyConfig(block_n=16, block_k=32, split_k=1, use_dot=False),
    "fma-step-split": SkinnyConfig(block_n=64, block_k=64, split_k=3, use_dot=False, num_warps=1),
    "dot": SkinnyConfig(block_n=32, block_k=64, split_k=1, use_dot=True),
    "dot-split": SkinnyConfig(block_n=16, block_k=32, split_k=4, use_dot=True),
    "heuristic": None,
}


def randn(*shape: int, dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device).manual_seed(seed)
    return torch.randn(*shape, generator=gen, device=device).to(dtype)


def make_inputs(m, n, k, dtype, device, bias=False, seed=0):
    x = randn(m, k, dtype=dtype, device=device, seed=seed)
    w = randn(n, k, dtype=dtype, device=device, seed=seed + 1)
    b = randn(n, dtype=dtype, device=device, seed=seed + 2) if bias else None
    return x, w, b


def check(out, x, w, bias=None, u=None, label=""):
    """out ~ F.linear(x, w, bias) computed in float64 (see the module docstring)."""
    u = UNIT_ROUNDOFF[x.dtype] if u is None else u
    b64 = None if bias is None else bias.double()
    ref = F.linear(x.double(), w.double(), b64)
    scale = F.linear(x.double().abs(), w.double().abs(), None if b64 is None else b64.abs())
    assert out.shape == ref.shape and out.dtype == x.dtype, (out.shape, out.dtype)
    assert torch.isfinite(out).all(), f"{label}: non-finite output"
    err = (out.double() - ref).abs()
    worst = (err / (u * ref.abs() + ACC_TOL * scale)).max().item()
    assert worst <= 1.0, f"{label}: an error {worst:.3g}x its bound (max abs {err.max():.3g})"
    rel = (err.norm() / ref.norm()).item()
    bound = max(u, 1e-5)  # float32: the accumulation order dominates
    assert rel <= bound, f"{label}: relative error {rel:.3g} in norm, bound {bound:.3g}"


# Interpreter (CPU) tests.


def test_interpreter_suite_in_subprocess():
    """The interpreter tests run: here when triton was imported in interpreter mode, else in a
    subprocess that sets TRITON_INTERPRET before triton's first import."""
    check_interpreter_suite(__file__, INTERPRETING)


@interpreter_test
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("n", "k"), [(50, 200), (40, 256)])
@pytest.mark.parametrize("m", [1, 3, 8, 16])
def test_fp32_interpreter(m, n, k, bias, config):
    x, w, b = make_inputs(m, n, k, torch.float32, "cpu", bias)
    check(skinny_linear(x, w, b, CONFIGS[config]), x, w, b, label=config)


def _half_cases() -> list[tuple[int, torch.dtype, str]]:
    # The interpreter's tl.dot multiplies bfloat16 bit patterns as integers (triton 3.9
    # stores bfloat16 as uint16 in numpy), so bfloat16 on the tensor-core path (including the
    # heuristic's choice for M > 1) is checked by the GPU tests only.
    cases = [(m, dtype, c) for m in (1, 3, 8, 16) for dtype in HALF_DTYPES for c in CONFIGS]
    return [
        (m, dtype, c)
        for m, dtype, c in cases
        if dtype != torch.bfloat16
        or not (CONFIGS[c].use_dot if CONFIGS[c] else skinny_config(m, 72, 136).use_dot)
    ]


@interpreter_test
@pytest.mark.parametrize(("m", "dtype", "config"), _half_cases())
def test_half_interpreter(m, dtype, config):
    x, w, b = make_inputs(m, 72, 136, dtype, "cpu", bias=True, seed=m)
    u = INTERPRETER_BF16_U if dtype == torch.bfloat16 else None
    check(skinny_linear(x, w, b, CONFIGS[config]), x, w, b, u=u, label=config)


@interpreter_test
def test_interpreter_strided_inputs_and_leading_dims():
    # W a column slice of a wider matrix (row stride > K); x with two leading dims, and x
    # rows that are a strided view.
    wide = randn(40, 100, dtype=torch.float32, device="cpu", seed=1)
    w = wide[:, :72]
    x = randn(2, 3, 72, dtype=torch.float32, device="cpu")
    config = CONFIGS["dot-split"]
    out = skinny_linear(x, w, None, config)
    assert out.shape == (2, 3, 40)
    check(out.reshape(6, 40), x.reshape(6, 72), w)
    rows = randn(8, 72, dtype=torch.float32, device="cpu")[::2]
    check(skinny_linear(rows, w, None, CONFIGS["fma-step-split"]), rows, w)


@interpreter_test
def test_interpreter_lm_head_like_block_edge():
    # N one past a multiple of the block: the last tile holds one valid row.
    x, w, b = make_inputs(2, 65, 64, torch.float32, "cpu", bias=True)
    check(skinny_linear(x, w, b, SkinnyConfig(block_n=64, block_k=32)), x, w, b)


def test_fallbacks_and_bad_arguments():
    # More than MAX_M rows, or none, go to F.linear (no kernel: runs anywhere).
    x, w, b = make_inputs(17, 24, 32, torch.float32, "cpu", bias=True)
    assert torch.equal(skinny_linear(x, w, b), F.linear(x, w, b))
    assert skinny_linear(x[:0], w).shape == (0, 24)
    with pytest.raises(ValueError, match="weight"):
        skinny_linear(x, w[:, :16])
    with pytest.raises(ValueError, match="weight"):
        skinny_linear(x, w.half())
    with pytest.raises(ValueError, match="bias"):
        skinny_linear(x, w, b[:8])


@pytest.mark.parametrize("m", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("shape", SHAPES)
def test_heuristic_fills_the_gpu(shape, m):
    n, k = SHAPES[shape]
    cfg = skinny_config(m, n, k, num_sms=132)
    for size in (cfg.block_n, cfg.block_k):
        assert size >= 16 and size & (size - 1) == 0
    programs = triton.cdiv(n, cfg.block_n) * cfg.split_k
    k_iters = triton.cdiv(k, cfg.block_k)
    assert programs >= 2 * 132, cfg
    assert k_iters % cfg.split_k == 0, cfg  # the real shapes all get equal, unmasked splits
    if n >= 128256:
        assert cfg.split_k == 1, cfg  # enough N tiles: no workspace round trip
    candidates = candidate_configs(m, n, k, num_sms=132)
    assert candidates["heuristic"] == cfg
    assert len(set(candidates.values())) == len(candidates) >= 3


# GPU tests: compiled kernels, real shapes.


@functools.cache
def gpu_weight(shape: str, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    n, k = SHAPES[shape]
    return randn(n, k, dtype=dtype, device="cuda", seed=7) / k**0.5


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("shape", SHAPES)
def test_gpu_real_shapes(shape, m):
    w = gpu_weight(shape)
    x = randn(m, w.shape[1], dtype=w.dtype, device="cuda", seed=m)
    out = skinny_linear(x, w)
    check(out, x, w, label=f"{shape} M={m}")
    # A fixed reduction order: bitwise the same on every run.
    assert torch.equal(skinny_linear(x, w), out)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("shape", SHAPES)
def test_gpu_candidate_configs(shape, m):
    # Every configuration the benchmark sweeps gives right answers.
    w = gpu_weight(shape)
    x = randn(m, w.shape[1], dtype=w.dtype, device="cuda", seed=m)
    n, k = w.shape
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for name, config in candidate_configs(m, n, k, sms).items():
        check(skinny_linear(x, w, None, config), x, w, label=f"{shape} M={m} {name} {config}")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("shape", ["1b-qkv", "1b-down", "8b-o"])
def test_gpu_other_dtypes_with_bias(shape, dtype, m):
    n, k = SHAPES[shape]
    x, w, b = make_inputs(m, n, k, dtype, "cuda", bias=True, seed=m)
    check(skinny_linear(x, w, b), x, w, b, label=f"{shape} {dtype} M={m}")


@pytest.mark.gpu
@requires_cuda
def test_gpu_cuda_graph_replay_reads_fresh_inputs():
    # Split-K with bias (o_proj, tensor cores), batch 1 (FMA path) and no split (gate/up).
    cases = [("1b-o", 4, True), ("1b-down", 1, False), ("1b-gate_up", 8, False)]
    inputs = []
    for shape, m, bias in cases:
        x, w, b = make_inputs(m, *SHAPES[shape], torch.bfloat16, "cuda", bias, seed=m)
        inputs.append((x, w, b))

    def step() -> list[torch.Tensor]:
        return [skinny_linear(x, w, b) for x, w, b in inputs]

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for (x, _, b), out in zip(inputs, outs, strict=True):
        x.copy_(torch.randn_like(x))
        if b is not None:
            b.copy_(torch.randn_like(b))
        out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    for (shape, m, _), (x, w, b), out in zip(cases, inputs, outs, strict=True):
        check(out, x, w, b, label=f"graph {shape} M={m}")
