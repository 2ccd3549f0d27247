"""Fused RMSNorm / add+RMSNorm / SiLU-and-mul / rotary kernels against their PyTorch twins.

The references are the twins in ``parallm.kernels.reference``, which round as the model's
PyTorch modules do (checked here too). Half-precision results are compared in units in the
last place (ulp): the kernels reproduce PyTorch's rounding order, so most outputs must match
bit for bit.

Without CUDA the kernels run under the Triton interpreter (see ``triton_interpreter``).
"""

from __future__ import annotations

import pytest  # noqa: E402
import torch
import torch.nn.functional as F
from triton_interpreter import (  # before triton: sets the interpreter
    check_interpreter_suite,
    kernel_modes,
)

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from parallm.kernels import elementwise as fused_ops  # noqa: E402
from parallm.kernels import rope_store  # noqa: E402
from parallm.kernels.elementwise import (  # noqa: E402
    fused_add_rms_norm,
    rms_norm,
    silu_and_mul,
)
from parallm.kernels.reference import (  # noqa: E402
    apply_rotary_ref,
    fused_add_rms_norm_ref,
    rms_norm_ref,
    silu_and_mul_ref,
)
from parallm.layers.norm import RMSNorm  # noqa: E402
from parallm.layers.rotary import RotaryEmbedding  # noqa: E402

INTERPRETING, interpreter_test, requires_cuda = kernel_modes(fused_ops._rms_norm_kernel)

HALF_DTYPES = [torch.bfloat16, torch.float16]
ALL_DTYPES = [torch.float32, *HALF_DTYPES]
EPS = 1e-5
# Llama 3 rope scaling over an 8-position original context: its frequency changes show at the
# small head dims these tests use.
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,
}


# Comparison helpers.


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of their (shared) dtype lie between a and b."""
    assert a.dtype == b.dtype and a.shape == b.shape
    width = torch.finfo(a.dtype).bits
    int_dtype = {16: torch.int16, 32: torch.int32}[width]

    def ordered(x: torch.Tensor) -> torch.Tensor:
        # Sign-magnitude bit patterns -> a monotonic integer line (+0 and -0 both map to 0).
        i = x.contiguous().view(int_dtype).long()
        return torch.where(i < 0, -(2 ** (width - 1)) - i, i)

    return (ordered(a) - ordered(b)).abs()


def assert_matches(
    out: torch.Tensor, ref: torch.Tensor, max_ulp: int = 0, max_mismatch: float = 0.0, label=""
) -> None:
    """Half precision: within max_ulp everywhere and bit-exact on all but max_mismatch of it.
    float32: within 1e-6 relative (plus a tiny absolute floor for values near zero)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all(), f"{label}: non-finite output (unwritten NaN poison?)"
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6, msg=lambda m: f"{label}: {m}")
        return
    dist = ulp_distance(out, ref)
    mismatch = (dist > 0).float().mean().item()
    worst = dist.max().item()
    assert worst <= max_ulp, f"{label}: max {worst} ulp, {mismatch:.2e} differ"
    assert mismatch <= max_mismatch, f"{label}: {mismatch:.2e} of outputs differ from PyTorch"


def nan_like(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.full(x.shape, float("nan"), dtype=dtype or x.dtype, device=x.device)


def randn(*shape: int, dtype: torch.dtype, device: str, scale: float = 1.0, seed: int = 0):
    gen = torch.Generator(device).manual_seed(seed)
    return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)


def make_qkv(tokens, num_q_heads, num_kv_heads, head_dim, dtype, device, seed=0):
    """q, k and v as strided views into one fused qkv projection output, as in the model."""
    widths = [num_q_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    qkv = randn(tokens, sum(widths), dtype=dtype, device=device, scale=2.0, seed=seed)
    q, k, v = qkv.split(widths, dim=-1)
    return (
        q.view(tokens, num_q_heads, head_dim),
        k.view(tokens, num_kv_heads, head_dim),
        v.view(tokens, num_kv_heads, head_dim),
    )


def make_qk(tokens, num_q_heads, num_k_heads, head_dim, dtype, device, seed=0):
    """q and k of :func:`make_qkv`."""
    return make_qkv(tokens, num_q_heads, num_k_heads, head_dim, dtype, device, seed)[:2]


# Checks shared by the interpreter and GPU tests.


def check_rms_norm(shape, dtype, device, weight_dtype=None, max_ulp=0, max_mismatch=0.0):
    x = randn(*shape, dtype=dtype, device=device, scale=3.0)
    weight = randn(shape[-1], dtype=weight_dtype or dtype, device=device, seed=1)
    out_dtype = torch.promote_types(dtype, weight.dtype)
    out = rms_norm(x, weight, EPS, out=nan_like(x, out_dtype))
    assert_matches(out, rms_norm_ref(x, weight, EPS), max_ulp, max_mismatch)


def check_fused_add_rms_norm(shape, dtype, device, in_place=False, max_ulp=0, max_mismatch=0.0):
    x = randn(*shape, dtype=dtype, device=device, seed=2)
    residual = randn(*shape, dtype=dtype, device=device, scale=4.0, seed=3)
    weight = randn(shape[-1], dtype=dtype, device=device, seed=4)
    expected, expected_residual = fused_add_rms_norm_ref(x, residual, weight, EPS)
    res_out = residual if in_place else nan_like(x)
    normed, new_residual = fused_add_rms_norm(
        x, residual, weight, EPS, out=nan_like(x), residual_out=res_out
    )
    assert new_residual.data_ptr() == res_out.data_ptr()
    assert torch.equal(new_residual, expected_residual)
    assert_matches(normed, expected, max_ulp, max_mismatch)


def check_silu_and_mul(rows, n, dtype, device, merged, max_ulp=0, max_mismatch=0.0):
    # Merged: one [rows, 2n] tensor. Separate: slices of wider rows, so row stride != n.
    wide = randn(rows, 2 * n + 8, dtype=dtype, device=device, scale=4.0, seed=5)
    gate, up = wide[:, :n], wide[:, n : 2 * n]
    expected = silu_and_mul_ref(gate, up)
    out = nan_like(expected)
    if merged:
        got = silu_and_mul(wide[:, : 2 * n].contiguous(), out=out)
    else:
        got = silu_and_mul(gate, up, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert_matches(got, expected, max_ulp, max_mismatch)


def rotate_and_store(q, k, rotary, positions, q_out=None):
    """Rotated q and k through the rotary + KV-store kernel (k read back from the cache)."""
    tokens, num_k_heads, head_dim = k.shape
    cache = torch.zeros(2, tokens, 1, num_k_heads, head_dim, dtype=k.dtype, device=k.device)
    slots = torch.arange(tokens, device=k.device)
    got_q = rope_store.rotary_and_store_kv(
        q, k, k, rotary.cos_cache, rotary.sin_cache, positions, cache, slots, q_out=q_out
    )
    return got_q, cache[0].view(tokens, num_k_heads, head_dim)


def check_rotary(
    tokens, heads, head_dim, dtype, device, in_place=False, max_ulp=0, max_mismatch=0.0, **kw
):
    num_q_heads, num_k_heads = heads
    max_pos = 4 * tokens + 16
    rotary = RotaryEmbedding(head_dim, max_pos, 10000.0, kw.get("scaling")).to(device)
    q, k = make_qk(tokens, num_q_heads, num_k_heads, head_dim, dtype, device)
    gen = torch.Generator().manual_seed(6)
    positions = torch.randint(0, max_pos, (tokens,), generator=gen).to(device)
    positions[0] = max_pos - 1  # the last cache row is reachable
    ref_q, ref_k = apply_rotary_ref(q, k, rotary.cos_cache, rotary.sin_cache, positions)
    q_out = q if in_place else nan_like(q)
    got_q, got_k = rotate_and_store(q, k, rotary, positions, q_out=q_out)
    assert got_q.data_ptr() == q_out.data_ptr()
    assert_matches(got_q, ref_q, max_ulp, max_mismatch, label="q")
    assert_matches(got_k, ref_k, max_ulp, max_mismatch, label="k")


# Interpreter (CPU) tests: small shapes.


def test_interpreter_suite_in_subprocess():
    """The interpreter tests run: here when triton was imported in interpreter mode, else in a
    subprocess that sets TRITON_INTERPRET before triton's first import."""
    check_interpreter_suite(__file__, INTERPRETING)


@triton.jit
def _round_kernel(x_ptr, out_ptr, n, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(out_ptr + offs, fused_ops._round_to(x, DTYPE), mask=offs < n)


@interpreter_test
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # inf is expected
@pytest.mark.parametrize(
    ("dtype", "tl_dtype"), [(torch.bfloat16, tl.bfloat16), (torch.float16, tl.float16)]
)
def test_round_to_matches_torch_casts(dtype, tl_dtype):
    # Ties both ways, negatives, overflow to inf, subnormals, NaN, and random values.
    bf16_ulp_at_1 = 2.0**-7
    special = [1 + bf16_ulp_at_1 / 2, 1 + 1.5 * bf16_ulp_at_1, -(1 + bf16_ulp_at_1 / 2)]
    special += [3.4e38, -3.4e38, 70000.0, 1e-40, -3e-39, 1e-8, 0.0, -0.0, float("inf")]
    x = torch.cat([torch.tensor(special), randn(200, dtype=torch.float32, device="cpu")])
    x = torch.cat([x, x * 1e-3, x * 1e4])
    out = torch.full_like(x, float("nan"))
    _round_kernel[(1,)](x, out, x.numel(), DTYPE=tl_dtype, BLOCK=triton.next_power_of_2(x.numel()))
    assert torch.equal(out, x.to(dtype).float())
    nan = torch.tensor([float("nan")] * 2)
    _round_kernel[(1,)](nan, out, 2, DTYPE=tl_dtype, BLOCK=2)
    assert out[:2].isnan().all()


@interpreter_test
@pytest.mark.parametrize("hidden", [40, 64, 96, 2048])
def test_rms_norm_interpreter_fp32(hidden):
    check_rms_norm((2, 3, hidden), torch.float32, "cpu")


# Half precision: the float32 sum of squares is added up in another order than torch's, which
# can move the intermediate rounding by one ulp (and then the product by up to two).
@interpreter_test
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("hidden", [96, 2048])
def test_rms_norm_interpreter_half(dtype, hidden):
    check_rms_norm((5, hidden), dtype, "cpu", max_ulp=2, max_mismatch=0.01)


@interpreter_test
@pytest.mark.parametrize(
    ("dtype", "weight_dtype"),
    [
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float16, torch.bfloat16),
    ],
)
def test_rms_norm_interpreter_mixed_weight_dtype(dtype, weight_dtype):
    # The result dtype follows type promotion of weight * x, as in RMSNorm.forward.
    check_rms_norm((4, 96), dtype, "cpu", weight_dtype=weight_dtype)


@interpreter_test
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("in_place", [False, True])
def test_fused_add_rms_norm_interpreter(dtype, in_place):
    check_fused_add_rms_norm((3, 2, 96), dtype, "cpu", in_place, max_ulp=2, max_mismatch=0.01)


@interpreter_test
@pytest.mark.parametrize("in_place", [False, True])
def test_norms_interpreter_chunked_rows(monkeypatch, in_place):
    # Rows longer than one block take the two-pass path; 100 = 3 full chunks + a partial one.
    monkeypatch.setattr(fused_ops, "_MAX_NORM_BLOCK", 64)
    monkeypatch.setattr(fused_ops, "_NORM_CHUNK", 32)
    check_rms_norm((3, 100), torch.float32, "cpu")
    check_fused_add_rms_norm((3, 100), torch.float32, "cpu", in_place)
    check_fused_add_rms_norm((3, 96), torch.bfloat16, "cpu", in_place, max_ulp=2, max_mismatch=0.02)


@interpreter_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_interpreter_narrow_rows_share_programs(dtype):
    # Per-head norms: 148 rows of 16 elements take 128 rows a program, the second program
    # holding 20 real rows and 108 masked ones.
    assert fused_ops._norm_launch(148, 16)[2] == 128
    check_rms_norm((37, 4, 16), dtype, "cpu", max_ulp=2, max_mismatch=0.01)
    for in_place in (False, True):
        check_fused_add_rms_norm((37, 4, 16), dtype, "cpu", in_place, max_ulp=2, max_mismatch=0.01)


@interpreter_test
def test_rms_norm_interpreter_allocates_and_keeps_shape():
    x = randn(2, 3, 40, dtype=torch.float32, device="cpu")
    weight = randn(40, dtype=torch.float32, device="cpu", seed=1)
    out = rms_norm(x, weight, EPS)
    assert out.shape == x.shape and out.is_contiguous()
    assert_matches(out, rms_norm_ref(x, weight, EPS))
    normed, new_residual = fused_add_rms_norm(x, x * 2, weight, EPS)
    assert torch.equal(new_residual, x * 3)
    assert_matches(normed, rms_norm_ref(x * 3, weight, EPS))


@interpreter_test
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("merged", [True, False])
@pytest.mark.parametrize("n", [40, 96, 1500])
def test_silu_and_mul_interpreter(dtype, merged, n):
    # 1500 spans two column blocks. exp differs between numpy and torch by an ulp at most.
    check_silu_and_mul(3, n, dtype, "cpu", merged, max_ulp=2, max_mismatch=0.01)


@interpreter_test
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # inf is expected
def test_silu_and_mul_interpreter_extremes():
    gate = torch.tensor([[-200.0, -30.0, -1e-3, 1e-3, 30.0, 200.0, 88.0, -88.0]])
    up = torch.tensor([[1.5, -2.0, 3.0, 0.5, -1.0, 2.0, 1e30, 1e30]])
    out = silu_and_mul(gate, up)
    torch.testing.assert_close(out, silu_and_mul_ref(gate, up), rtol=1e-6, atol=0)
    merged = silu_and_mul(torch.cat([gate, up], dim=-1).expand(3, 3, -1))
    assert merged.shape == (3, 3, 8)
    torch.testing.assert_close(merged[2, 1], out[0], rtol=0, atol=0)


# Rotary in half precision is fully determined by the rounding order: bit-exact.
@interpreter_test
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize(("heads", "head_dim"), [((4, 2), 64), ((3, 1), 40), ((6, 6), 128)])
def test_rotary_interpreter(dtype, heads, head_dim):
    check_rotary(5, heads, head_dim, dtype, "cpu")


@interpreter_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_interpreter_in_place_many_head_blocks(monkeypatch, dtype):
    # A small tile splits q and k into several head blocks each (with a partial last one).
    monkeypatch.setattr(rope_store, "_TILE", 64)
    check_rotary(4, (5, 3), 64, dtype, "cpu", in_place=True)


@interpreter_test
def test_rotary_interpreter_llama3_scaling():
    check_rotary(6, (4, 2), 64, torch.bfloat16, "cpu", scaling=LLAMA3_SCALING)


@interpreter_test
def test_empty_inputs_interpreter():
    weight = torch.ones(64)
    assert rms_norm(torch.empty(0, 64), weight, EPS).shape == (0, 64)
    normed, res = fused_add_rms_norm(torch.empty(0, 64), torch.empty(0, 64), weight, EPS)
    assert normed.shape == res.shape == (0, 64)
    assert silu_and_mul(torch.empty(0, 128)).shape == (0, 64)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_twins_round_as_the_torch_layers(dtype):
    """The twins are the model's PyTorch path: RMSNorm (with and without the residual),
    RotaryEmbedding and F.silu(gate) * up give the same bits on random inputs."""
    x = randn(3, 5, 96, dtype=dtype, device="cpu", scale=3.0)
    residual = randn(3, 5, 96, dtype=dtype, device="cpu", seed=1)
    norm = RMSNorm(96, EPS).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(randn(96, dtype=dtype, device="cpu", seed=2))
        assert torch.equal(rms_norm_ref(x, norm.weight, EPS), norm(x))
        for got, want in zip(fused_add_rms_norm_ref(x, residual, norm.weight, EPS),
                             norm(x, residual), strict=True):  # fmt: skip
            assert torch.equal(got, want)
    gate_up = randn(4, 2 * 48, dtype=dtype, device="cpu", scale=4.0, seed=3)
    assert torch.equal(silu_and_mul_ref(gate_up), F.silu(gate_up[:, :48]) * gate_up[:, 48:])
    rotary = RotaryEmbedding(64, 40, 10000.0, None)
    q, k = make_qk(6, 4, 2, 64, dtype, "cpu", seed=4)
    positions = torch.tensor([0, 39, 7, 7, 1, 20])
    got = apply_rotary_ref(q, k, rotary.cos_cache, rotary.sin_cache, positions)
    for a, b in zip(got, rotary(positions, q, k), strict=True):
        assert torch.equal(a, b)


def test_bad_arguments_raise():
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(32), EPS)
    with pytest.raises(ValueError, match="residual"):
        fused_add_rms_norm(x, x.half(), torch.ones(64), EPS)
    with pytest.raises(ValueError, match="out"):
        rms_norm(x, torch.ones(64), EPS, out=torch.empty(2, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(torch.randn(2, 7))
    with pytest.raises(ValueError, match="share"):
        silu_and_mul(x, x[:, :32])
    rotary = RotaryEmbedding(64, 8, 10000.0, None)
    with pytest.raises(ValueError, match="positions"):
        rotate_and_store(torch.randn(3, 2, 64), torch.randn(3, 1, 64), rotary, torch.zeros(2))
    with pytest.raises(ValueError, match="even head_dim"):
        odd = RotaryEmbedding(62, 8, 10000.0, None)
        odd.cos_cache = odd.sin_cache = torch.randn(8, 63)
        rotate_and_store(torch.randn(3, 2, 63), torch.randn(3, 1, 63), odd, torch.zeros(3))


# GPU tests: compiled kernels, real sizes, against the modules on the GPU.

GPU_MISMATCH = 1e-3


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("hidden", [64, 128, 1024, 2048, 4096])  # up to 32 rows a program
@pytest.mark.parametrize("tokens", [1, 7, 4096])
def test_rms_norm_gpu(dtype, hidden, tokens):
    check_rms_norm((tokens, hidden), dtype, "cuda", max_ulp=2, max_mismatch=GPU_MISMATCH)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("hidden", [128, 1024, 2048, 4096, 20000])
@pytest.mark.parametrize("tokens", [1, 4096])
@pytest.mark.parametrize("in_place", [False, True])
def test_fused_add_rms_norm_gpu(dtype, hidden, tokens, in_place):
    # 20000 > _MAX_NORM_BLOCK: the chunked path.
    shape = (tokens, hidden)
    check_fused_add_rms_norm(shape, dtype, "cuda", in_place, max_ulp=2, max_mismatch=GPU_MISMATCH)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("n", [8192, 14336])
@pytest.mark.parametrize("tokens", [1, 4096])
@pytest.mark.parametrize("merged", [True, False])
def test_silu_and_mul_gpu(dtype, n, tokens, merged):
    check_silu_and_mul(tokens, n, dtype, "cuda", merged, max_ulp=2, max_mismatch=GPU_MISMATCH)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", [(32, 8), (16, 16), (28, 4)])
@pytest.mark.parametrize("tokens", [1, 33, 4096])
def test_rotary_gpu(dtype, head_dim, heads, tokens):
    # Expected bit-exact (no transcendental, same rounding points); the bound is the spec's.
    check_rotary(tokens, heads, head_dim, dtype, "cuda", max_ulp=1, max_mismatch=GPU_MISMATCH)


@pytest.mark.gpu
@requires_cuda
def test_fused_ops_in_cuda_graph():
    dtype, tokens, hidden, inter, heads, head_dim = torch.bfloat16, 8, 2048, 8192, (32, 8), 64
    x = randn(tokens, hidden, dtype=dtype, device="cuda")
    residual = randn(tokens, hidden, dtype=dtype, device="cuda", seed=1)
    weight = randn(hidden, dtype=dtype, device="cuda", seed=2)
    gate_up = randn(tokens, 2 * inter, dtype=dtype, device="cuda", seed=3)
    q, k = make_qk(tokens, *heads, head_dim, dtype, "cuda", seed=4)
    rotary = RotaryEmbedding(head_dim, 1024, 500000.0, None).to("cuda")
    positions = torch.arange(100, 100 + tokens, device="cuda")
    outs = {
        "norm": torch.empty_like(x),
        "add_norm": torch.empty_like(x),
        "residual": torch.empty_like(x),
        "silu": torch.empty(tokens, inter, dtype=dtype, device="cuda"),
        "q": torch.empty_like(q),
    }
    kv_cache = torch.empty(2, tokens, 1, heads[1], head_dim, dtype=dtype, device="cuda")
    slots = torch.arange(tokens, device="cuda")

    def step() -> None:
        rms_norm(x, weight, EPS, out=outs["norm"])
        fused_add_rms_norm(
            x, residual, weight, EPS, out=outs["add_norm"], residual_out=outs["residual"]
        )
        silu_and_mul(gate_up, out=outs["silu"])
        rope_store.rotary_and_store_kv(
            q, k, k, rotary.cos_cache, rotary.sin_cache, positions, kv_cache, slots,
            q_out=outs["q"],
        )  # fmt: skip

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    # New inputs after capture: the replay must read them, not what was there at capture.
    for t in (x, residual, gate_up, q, k):
        t.copy_(torch.randn_like(t))
    positions.add_(7)
    for out in (*outs.values(), kv_cache):
        out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    outs["k"] = kv_cache[0].view(tokens, heads[1], head_dim)

    ref_q, ref_k = apply_rotary_ref(q, k, rotary.cos_cache, rotary.sin_cache, positions)
    add_norm, summed = fused_add_rms_norm_ref(x, residual, weight, EPS)
    expected = {
        "norm": rms_norm_ref(x, weight, EPS),
        "add_norm": add_norm,
        "residual": summed,
        "silu": silu_and_mul_ref(gate_up),
        "q": ref_q,
        "k": ref_k,
    }
    for name, ref in expected.items():
        assert_matches(outs[name], ref, max_ulp=2, max_mismatch=0.01, label=name)
