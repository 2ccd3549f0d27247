"""The fp8 (e4m3) KV cache: quantize/dequantize bounds, the reference attention over an fp8
cache against float attention, and the Triton store and attention kernels against their
PyTorch twins (``quantize_kv_ref``, ``rotary_and_store_kv_ref``, ``paged_*_attention_ref``).

The Triton interpreter handles float8e4nv loads, stores and widening casts on CPU (checked
here for all 256 codes); its float32 -> fp8 cast does not round to nearest, which is why the
kernels round to e4m3 by hand (``rope_store._round_to_e4m3``) and cast values that are
already on the grid. Without CUDA the kernels run under the interpreter (see
``triton_interpreter``); the GPU tests run bf16/fp16 models with head sizes 64 and 128.
"""

from __future__ import annotations

import math

import pytest  # noqa: E402
import torch
from triton_interpreter import check_interpreter_suite, kernel_modes  # before triton

from parallm.kernels.reference import (
    FP8_E4M3_MAX,
    dequantize_kv_ref,
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
    quantize_kv_ref,
    rotary_and_store_kv_ref,
)

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from test_paged_attention import make_paged_case  # noqa: E402

from parallm.kernels import paged_decode, paged_prefill, rope_store  # noqa: E402
from parallm.kernels.paged_decode import paged_decode_attention  # noqa: E402
from parallm.kernels.paged_prefill import paged_prefill_attention  # noqa: E402
from parallm.kernels.rope_store import NewTokenRope, rotary_and_store_kv  # noqa: E402
from parallm.layers.rotary import RotaryEmbedding  # noqa: E402

INTERPRETING, interpreter_test, requires_cuda = kernel_modes(paged_prefill._prefill_kernel)
FP8 = torch.float8_e4m3fn
# Per element: at most half an e4m3 step, 2^-4 of the value for normals (3 mantissa bits), and
# 2^-10 (half the subnormal step 2^-9) below 2^-6; both times the scale.
REL_BOUND = 2.0**-4
SUBNORMAL_ABS_BOUND = 2.0**-10
# Not 1.0, so that a scale applied twice, inverted or dropped shows.
KV_SCALE = torch.tensor([0.5, 1.5])


def element_bound(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The largest error e4m3 rounding may make on each element of ``x`` (within +-448 scale)."""
    return REL_BOUND * x.abs() + SUBNORMAL_ABS_BOUND * scale


# --- quantize / dequantize (PyTorch) ---------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 0.03, 7.0])
def test_round_trip_error_is_within_e4m3_bound(scale):
    gen = torch.Generator().manual_seed(0)
    # Magnitudes from deep in the subnormals to the top of the range, both signs.
    x = torch.randn(200_000, generator=gen) * torch.exp2(torch.empty(200_000).uniform_(-14, 9))
    x = x.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX) * scale
    s = torch.tensor(scale)
    back = dequantize_kv_ref(quantize_kv_ref(x, s), s, torch.float64)
    err = (back - x.double()).abs()
    assert (err <= element_bound(x.double(), scale)).all()
    normal = x.abs() >= 2.0**-6 * scale
    assert (err[normal] <= REL_BOUND * x.double().abs()[normal]).all()
    # The bound is tight: some elements sit almost half a step from their e4m3 value.
    assert (err[normal] / x.double().abs()[normal]).max() > 0.9 * REL_BOUND


def test_out_of_range_values_clamp_to_448_never_inf_or_nan():
    s = torch.tensor(2.0)
    x = torch.tensor([1e6, -1e6, float("inf"), -float("inf"), 896.0, 897.0, -900.0])
    q = quantize_kv_ref(x, s)
    assert torch.equal(q.float(), torch.tensor([448.0, -448, 448, -448, 448, 448, -448]))
    assert torch.isnan(quantize_kv_ref(torch.tensor([float("nan")]), s).float()).all()


def test_every_e4m3_value_widens_exactly_to_the_model_dtypes():
    """What lets the kernels widen fp8 tiles to q's dtype before the dots, losing nothing."""
    codes = torch.arange(256, dtype=torch.uint8).view(FP8)
    finite = ~torch.isnan(codes.float())
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(codes.to(dtype)[finite].double(), codes.double()[finite])


# --- reference attention over an fp8 cache against float attention ---------------------------


def fp8_case(case: dict, kv_scale: torch.Tensor) -> dict:
    """``case`` with its caches quantized to e4m3 with ``kv_scale``."""
    k8 = quantize_kv_ref(case["k_cache"], kv_scale[0].to(case["k_cache"].device))
    v8 = quantize_kv_ref(case["v_cache"], kv_scale[1].to(case["v_cache"].device))
    return {**case, "k_cache": k8, "v_cache": v8, "kv_scale": kv_scale.to(k8.device)}


def attention_error_bound(case: dict, kv_scale: torch.Tensor) -> torch.Tensor:
    """Per query row and head, the largest difference e4m3 rounding of the context's k and v
    may make to the attention output (float64, from the data).

    A key element's error is at most ``e(k)`` (``element_bound``), so a score moves by at most
    ``M = scale * sum_d |q_d| e(k_d)``; the softmax weights then move by at most
    ``exp(2M) - 1`` in total (each ``p_j`` changes by a factor within ``exp(+-2M)``), and the
    output by that times ``max |v|`` plus the values' own ``max e(v)``."""
    k_scale, v_scale = kv_scale.tolist()
    block_size, num_kv_heads, _ = case["k_cache"].shape[1:]
    groups = case["q"].shape[1] // num_kv_heads
    starts = case["query_start_loc"].tolist()
    bounds = torch.zeros(case["q"].shape[:2], dtype=torch.float64)
    for b, seq_len in enumerate(case["seq_lens"].tolist()):
        pages = case["block_tables"][b, : math.ceil(seq_len / block_size)].long()
        k, v = (c[pages].reshape(-1, num_kv_heads, c.shape[-1])[:seq_len].double().cpu()
                for c in (case["k_cache"], case["v_cache"]))  # fmt: skip
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        q = case["q"][starts[b] : starts[b + 1]].double().cpu()
        score_err = case["scale"] * torch.einsum("qhd,khd->qhk", q.abs(), element_bound(k, k_scale))
        weight_err = torch.expm1(2 * score_err.amax(-1))
        value_err = element_bound(v, v_scale).amax(dim=(0, 2))
        bounds[starts[b] : starts[b + 1]] = weight_err * v.abs().amax(dim=(0, 2)) + value_err
    return bounds


def test_reference_fp8_attention_is_within_the_bound_of_float_attention():
    lens = [(1, 1), (7, 7), (20, 37), (1, 100), (16, 64)]
    case = make_paged_case(lens, 4, 2, 64, 16, torch.float64, "cpu", seed=2)
    quant = fp8_case(case, KV_SCALE)
    args = (case["block_tables"], case["query_start_loc"], case["seq_lens"], 20, case["scale"])
    want = paged_prefill_attention_ref(case["q"], case["k_cache"], case["v_cache"], *args)
    got = paged_prefill_attention_ref(case["q"], quant["k_cache"], quant["v_cache"], *args,
                                      kv_scale=quant["kv_scale"])  # fmt: skip
    err = (got - want).abs().amax(-1)
    # Rigorous, and loose (exp(2M) - 1 assumes every key's score error adds up): measured
    # errors stay below 5% of it.
    assert (err <= attention_error_bound(case, KV_SCALE)).all()
    # Tight, stated from e4m3's own error: over the whole output, the relative L2 error is
    # within the per-element worst case 2^-4 (the rounding errors do not add up; measured
    # 0.031), and not zero (the caches do hold e4m3 values).
    rel = ((got - want).norm() / want.norm()).item()
    assert 1e-3 < rel <= REL_BOUND


def test_reference_backend_needs_the_scales_of_an_fp8_cache():
    from parallm.layers.attention import write_kv

    cache = torch.zeros(2, 2, 16, 1, 8, dtype=FP8)
    k = torch.randn(3, 1, 8)
    with pytest.raises(ValueError, match="fp8 KV cache needs kv_scale"):
        write_kv(k, k, cache, torch.tensor([0, 5, 17]))
    write_kv(k, 2 * k, cache, torch.tensor([0, 5, 17]), KV_SCALE)
    flat = cache.view(2, -1, 1, 8)[:, [0, 5, 17]]
    assert torch.equal(flat[0].view(torch.uint8), quantize_kv_ref(k, KV_SCALE[0]).view(torch.uint8))
    assert torch.equal(
        flat[1].view(torch.uint8), quantize_kv_ref(2 * k, KV_SCALE[1]).view(torch.uint8)
    )


# --- Triton: rounding, store, attention (interpreter on CPU) ---------------------------------


def test_interpreter_suite_in_subprocess():
    check_interpreter_suite(__file__, INTERPRETING)


@triton.jit
def _to_cache_kernel(x_ptr, out_ptr, scale, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(out_ptr + offs, rope_store.to_cache(x, scale, out_ptr.dtype.element_ty), mask=offs < n)


def check_rounding(device: str) -> None:
    steps = [2.0**e for e in range(-9, 9)]
    # Exact ties (half-way between e4m3 neighbours) in both the normal and subnormal ranges,
    # neighbours of the range ends, -0.0, and values far out of range.
    ties = [1 + 2**-4, 1 + 3 * 2**-4, 2**-10, 3 * 2**-10, 2**-6 - 2**-10, 416 + 16, 2**-6]
    special = [0.0, -0.0, 448.0, 449.0, 464.0, 1e30, 2.0**-7, 2.0**-12, 2**-6 * (1 - 2**-20)]
    gen = torch.Generator().manual_seed(1)
    wide = torch.randn(50_000, generator=gen) * torch.exp2(
        torch.rand(50_000, generator=gen) * 24 - 14
    )
    x = torch.cat([torch.tensor(steps + ties + special), wide])
    x = torch.cat([x, -x]).to(device)
    for scale in (1.0, 0.37):
        out = torch.empty(x.shape, dtype=FP8, device=device)
        _to_cache_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, scale, x.numel(), BLOCK=1024)
        want = quantize_kv_ref(x, torch.tensor(scale, device=device))
        assert torch.equal(out.view(torch.uint8), want.view(torch.uint8)), scale


@interpreter_test
def test_interpreter_handles_float8_loads_and_widening():
    """All 256 codes load and widen as PyTorch widens them (the two NaN codes aside)."""

    @triton.jit
    def widen(x_ptr, out_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, tl.load(x_ptr + offs).to(out_ptr.dtype.element_ty))

    codes = torch.arange(256, dtype=torch.uint8).view(FP8)
    finite = ~torch.isnan(codes.float())
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = torch.empty(256, dtype=dtype)
        widen[(1,)](codes, out, BLOCK=256)
        assert torch.equal(out[finite], codes.to(dtype)[finite])


@interpreter_test
def test_rounding_to_e4m3_matches_pytorchs_cast_interpreter():
    check_rounding("cpu")


# On CUDA the rotation may round one ulp of the model's dtype off PyTorch's (tests of
# test_rope_store.py), which can move an element across an e4m3 rounding boundary.
GPU_FP8_MISMATCH = 1e-3


def assert_same_fp8(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit for bit under the interpreter; on CUDA, a few elements one e4m3 step away."""
    differ = got.view(torch.uint8) != want.view(torch.uint8)
    if got.device.type == "cpu":
        assert not differ.any(), f"{int(differ.sum())} fp8 cache bytes differ"
        return
    # Only the differing bytes are compared as numbers: equal bytes are equal even where they
    # hold NaN (the unwritten slots of a test cache), and a differing NaN fails the bound.
    got_d, want_d = got[differ].float(), want[differ].float()
    step = REL_BOUND * 2 * want_d.abs() + 2.0**-9
    assert ((got_d - want_d).abs() <= step).all(), f"{int(differ.sum())} bytes differ"
    assert differ.float().mean().item() <= GPU_FP8_MISMATCH


def check_store(dtype, device, num_q_heads=4, num_kv_heads=2, head_dim=64, tokens=37):
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, generator=gen) * 3
    q, k, v = qkv.to(device, dtype).split(
        [num_q_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1
    )
    q, k, v = (t.view(tokens, -1, head_dim) for t in (q, k, v))
    rotary = RotaryEmbedding(head_dim, 512, 10000.0, None).to(device)
    positions = torch.randint(0, 512, (tokens,), generator=gen).to(device)
    num_blocks, block_size = 8, 16
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens].to(device)
    slots[3] = -1  # a padding row: stores nothing
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    cache = (torch.randn(shape, generator=gen) * 10).to(device, FP8)  # unwritten slots: random
    ref_cache, scale = cache.clone(), KV_SCALE.to(device)
    tables = (rotary.cos_cache, rotary.sin_cache, positions)
    got_q = rotary_and_store_kv(q, k, v, *tables, cache, slots, kv_scale=scale)
    want_q = rotary_and_store_kv_ref(q, k, v, *tables, ref_cache, slots, kv_scale=scale)
    # The twin's cache (unwritten slots untouched); q rotated as with a float cache.
    assert_same_fp8(cache, ref_cache)
    float_cache = torch.zeros(shape, dtype=dtype, device=device)
    assert torch.equal(got_q, rotary_and_store_kv(q, k, v, *tables, float_cache, slots))
    torch.testing.assert_close(got_q, want_q, rtol=1e-2, atol=1e-2)


@interpreter_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rope_store_kernel_quantizes_as_the_twin_interpreter(dtype):
    check_store(dtype, "cpu")


def check_prefill(lens, num_heads, num_kv_heads, head_dim, block_size, dtype, device, tol):
    case = fp8_case(make_paged_case(lens, num_heads, num_kv_heads, head_dim, block_size,
                                    dtype, device), KV_SCALE)  # fmt: skip
    max_q = max(q for q, _ in lens)
    args = (case["block_tables"], case["query_start_loc"], case["seq_lens"], max_q, case["scale"])
    out = paged_prefill_attention(case["q"], case["k_cache"], case["v_cache"], *args,
                                  out=torch.full_like(case["q"], float("nan")),
                                  kv_scale=case["kv_scale"])  # fmt: skip
    # The exact attention over the same fp8 cache, in float64.
    want = paged_prefill_attention_ref(case["q"].double(), case["k_cache"], case["v_cache"],
                                       *args, kv_scale=case["kv_scale"])  # fmt: skip
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert ((out.double() - want).norm() / want.norm()).item() < tol


def check_decode(seq_lens, num_heads, num_kv_heads, head_dim, dtype, device, tol):
    """Rotary and the fp8 store inside the decode kernel: the cache bytes equal the twin's,
    the output is within ``tol`` of the exact attention over that cache. The last row is a
    padding row (slot -1) when there are several."""
    lens = [(1, s) for s in seq_lens]
    case = fp8_case(make_paged_case(lens, num_heads, num_kv_heads, head_dim, 16, dtype, device,
                                    seed=5), KV_SCALE)  # fmt: skip
    gen = torch.Generator().manual_seed(11)
    batch, kv = len(seq_lens), num_kv_heads * head_dim
    qkv = (torch.randn(batch, num_heads * head_dim + 2 * kv, generator=gen) * 2).to(device, dtype)
    q, k, v = (t.view(batch, -1, head_dim) for t in qkv.split([num_heads * head_dim, kv, kv], -1))
    rotary = RotaryEmbedding(head_dim, 8192, 10000.0, None).to(device)
    positions = case["seq_lens"].long() - 1
    pages = case["block_tables"].long().gather(1, (positions // 16)[:, None])[:, 0]
    slots = pages * 16 + positions % 16
    if batch > 1:
        slots[-1] = -1
    rope = NewTokenRope(k, v, rotary.cos_cache, rotary.sin_cache, positions, slots)
    caches = [torch.stack([case["k_cache"], case["v_cache"]]) for _ in range(2)]
    args = (case["block_tables"], case["seq_lens"], case["scale"], max(seq_lens))
    out = paged_decode_attention(q, caches[0][0], caches[0][1], *args, rope=rope,
                                 kv_scale=case["kv_scale"])  # fmt: skip
    want = paged_decode_attention_ref(q, caches[1][0], caches[1][1], *args, rope=rope,
                                      kv_scale=case["kv_scale"])  # fmt: skip
    assert_same_fp8(caches[0], caches[1])
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert ((out.double() - want.double()).norm() / want.double().norm()).item() < tol


MIXED_LENS = [(1, 1), (5, 5), (17, 17), (3, 40), (20, 37), (1, 33), (16, 32)]


@interpreter_test
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 2), (2, 2)])
def test_prefill_kernel_reads_fp8_interpreter(num_heads, num_kv_heads):
    check_prefill(MIXED_LENS, num_heads, num_kv_heads, 64, 16, torch.float32, "cpu", 1e-5)


@interpreter_test
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_kernel_stores_and_reads_fp8_interpreter(num_splits, monkeypatch):
    monkeypatch.setattr(paged_decode, "decode_num_splits", lambda *args, **kw: num_splits)
    check_decode([1, 16, 17, 100, 300], 4, 2, 64, torch.float32, "cpu", 1e-5)


def test_kernels_need_the_scales_of_an_fp8_cache():
    case = fp8_case(make_paged_case([(3, 20)], 2, 1, 16, 16, torch.float32, "cpu"), KV_SCALE)
    args = (case["q"], case["k_cache"], case["v_cache"], case["block_tables"])
    rest = (case["query_start_loc"], case["seq_lens"], 3, case["scale"])
    with pytest.raises(ValueError, match="needs kv_scale"):
        paged_prefill_attention(*args, *rest)
    with pytest.raises(ValueError, match="kv_scale must be 2 contiguous float32"):
        paged_prefill_attention(*args, *rest, kv_scale=KV_SCALE.double())
    float_cache = case["k_cache"].float()
    with pytest.raises(ValueError, match="caches must both be in q's dtype"):
        paged_decode_attention(case["q"].double(), float_cache, float_cache, *args[3:],
                               case["seq_lens"], 1.0, 20)  # fmt: skip


# --- GPU: bf16/fp16 models, head sizes 64 and 128 ---------------------------------------------


@pytest.mark.gpu
@requires_cuda
def test_rounding_to_e4m3_matches_pytorchs_cast_gpu():
    check_rounding("cuda")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rope_store_kernel_quantizes_as_the_twin_gpu(dtype, head_dim):
    check_store(dtype, "cuda", num_q_heads=32, num_kv_heads=8, head_dim=head_dim, tokens=100)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(32, 8), (8, 8)])
def test_prefill_kernel_reads_fp8_gpu(dtype, head_dim, num_heads, num_kv_heads):
    lens = [(512, 512), (1, 2048), (100, 1100), (37, 37), (1, 1)]
    check_prefill(lens, num_heads, num_kv_heads, head_dim, 16, dtype, "cuda", 1e-2)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("seq_lens", [[4096], [4100, 1, 17, 2048], [777] * 40])
def test_decode_kernel_stores_and_reads_fp8_gpu(dtype, head_dim, seq_lens):
    check_decode(seq_lens, 32, 8, head_dim, dtype, "cuda", 1e-2)
