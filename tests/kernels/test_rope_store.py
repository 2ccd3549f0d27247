"""Fused rotary + paged KV store against its PyTorch twin, ``rotary_and_store_kv_ref``.

The twin rotates as the model's PyTorch path does and stores into a copy of the same cache.
Caches start filled with random values, so a slot the kernel must not touch is checked bit for
bit, and an unwritten one shows up too.

Without CUDA the kernel runs under the Triton interpreter (see ``triton_interpreter``).
"""

from __future__ import annotations

import pytest  # noqa: E402
import torch
from triton_interpreter import (  # before triton: sets the interpreter
    check_interpreter_suite,
    kernel_modes,
)

triton = pytest.importorskip("triton")
from test_elementwise import (  # noqa: E402
    LLAMA3_SCALING,
    assert_matches,
    make_qkv,
    nan_like,
    randn,
)

from parallm.kernels import rope_store as fused_rope_store  # noqa: E402
from parallm.kernels.reference import rotary_and_store_kv_ref  # noqa: E402
from parallm.kernels.rope_store import rotary_and_store_kv  # noqa: E402
from parallm.layers.rotary import RotaryEmbedding  # noqa: E402

INTERPRETING, interpreter_test, requires_cuda = kernel_modes(fused_rope_store._rope_store_kernel)

ALL_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def scattered_slots(tokens, num_blocks, block_size, gen, device):
    """Distinct slots spread over a random block table: gaps inside blocks and between them."""
    table = torch.randperm(num_blocks, generator=gen)[: max(1, num_blocks * 3 // 4)]
    table_slots = (table[:, None] * block_size + torch.arange(block_size)).flatten()
    assert tokens <= table_slots.numel() // 2, "leave at least half the slots unwritten"
    return table_slots[torch.randperm(table_slots.numel(), generator=gen)[:tokens]].to(device)


def check_rope_store(
    tokens, heads, head_dim, dtype, device, block_size=16, max_ulp=0, max_mismatch=0.0, **kw
):
    num_q_heads, num_kv_heads = heads
    gen = torch.Generator().manual_seed(7)
    max_pos = 4 * tokens + 16
    rotary = RotaryEmbedding(head_dim, max_pos, 10000.0, kw.get("scaling")).to(device)
    q, k, v = make_qkv(tokens, num_q_heads, num_kv_heads, head_dim, dtype, device)
    positions = torch.randint(0, max_pos, (tokens,), generator=gen).to(device)
    positions[0] = max_pos - 1  # the last cache row is reachable
    num_blocks = 4 * triton.cdiv(tokens, block_size) + 2
    slots = kw.get("slots")
    if slots is None:
        slots = scattered_slots(tokens, num_blocks, block_size, gen, device)
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    cache = randn(*shape, dtype=dtype, device=device, seed=8)
    ref_cache = cache.clone()
    ref_q = rotary_and_store_kv_ref(
        q, k, v, rotary.cos_cache, rotary.sin_cache, positions, ref_cache, slots
    )
    live = slots >= 0  # negative slots (padding rows) store nothing

    q_out = q if kw.get("in_place") else nan_like(q)
    got_q = rotary_and_store_kv(
        q, k, v, rotary.cos_cache, rotary.sin_cache, positions, cache, slots, q_out=q_out
    )
    assert got_q.data_ptr() == q_out.data_ptr()
    assert_matches(got_q, ref_q, max_ulp, max_mismatch, label="q")
    written = torch.zeros(shape[1] * shape[2], dtype=torch.bool, device=device)
    written[slots[live]] = True
    flat, ref_flat = (c.view(2, -1, num_kv_heads, head_dim) for c in (cache, ref_cache))
    assert torch.equal(flat[:, ~written], ref_flat[:, ~written]), "an unwritten slot changed"
    assert_matches(flat[0, written], ref_flat[0, written], max_ulp, max_mismatch, label="k")
    assert torch.equal(flat[1, written], ref_flat[1, written]), "v is stored unchanged"


def check_close_to_float64(tokens, heads, head_dim, device):
    """bf16 against the exact rotation, in relative terms: independent of the rounding-order
    argument behind the bit-exact checks."""
    rotary = RotaryEmbedding(head_dim, 4096, 500000.0, None).to(device)
    q, k, v = make_qkv(tokens, *heads, head_dim, torch.bfloat16, device, seed=3)
    positions = torch.randint(0, 4096, (tokens,), device=device)
    num_blocks = (2 * tokens + 31) // 16  # every slot drawn below is inside the cache
    cache = torch.zeros(2, num_blocks, 16, heads[1], head_dim, dtype=torch.bfloat16,
                        device=device)  # fmt: skip
    gen = torch.Generator(device=device).manual_seed(4)
    slots = torch.randperm(num_blocks * 16, device=device, generator=gen)[:tokens]
    got_q = rotary_and_store_kv(
        q, k, v, rotary.cos_cache, rotary.sin_cache, positions, cache, slots
    )
    cos = rotary.cos_cache[positions].double()[:, None]
    sin = rotary.sin_cache[positions].double()[:, None]

    def exact(x):
        x = x.double()
        rotated = torch.cat([-x[..., head_dim // 2 :], x[..., : head_dim // 2]], dim=-1)
        return x * cos + rotated * sin, x.abs() + rotated.abs()

    flat = cache.view(2, -1, heads[1], head_dim)
    for got, x in ((got_q, q), (flat[0, slots], k)):
        ref, size = exact(x)
        # Each term is rounded twice (cos/sin, then the product) and the sum once, each time
        # within bf16's unit roundoff 2^-8: at most 3 * 2^-8 of |x1| + |x2|, plus 2nd order.
        assert ((got.double() - ref).abs() <= 3.1 * 2**-8 * size).all()
    assert torch.equal(flat[1, slots], v)


# Interpreter (CPU) tests: small shapes, bit-exact in every dtype (float32 within 1e-6).


def test_interpreter_suite_in_subprocess():
    """The interpreter tests run: here when triton was imported in interpreter mode, else in a
    subprocess that sets TRITON_INTERPRET before triton's first import."""
    check_interpreter_suite(__file__, INTERPRETING)


@interpreter_test
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize(("heads", "head_dim"), [((4, 2), 64), ((8, 1), 128), ((3, 3), 40)])
@pytest.mark.parametrize("tokens", [1, 13])
def test_rope_store_interpreter(dtype, heads, head_dim, tokens):
    check_rope_store(tokens, heads, head_dim, dtype, "cpu")


@interpreter_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_store_interpreter_in_place_many_head_blocks(monkeypatch, dtype):
    # A small tile splits q and the kv heads into several blocks each (with a partial last one).
    monkeypatch.setattr(fused_rope_store, "_TILE", 64)
    check_rope_store(6, (5, 3), 64, dtype, "cpu", block_size=4, in_place=True)


@interpreter_test
def test_rope_store_interpreter_llama3_scaling_and_padding_rows():
    # Negative slots store nothing; their q is rotated all the same.
    slots = torch.tensor([3, -1, 40, 17, -5, 0])
    check_rope_store(6, (4, 2), 64, torch.bfloat16, "cpu", block_size=8, scaling=LLAMA3_SCALING,
                     slots=slots)  # fmt: skip


@interpreter_test
def test_rope_store_interpreter_bf16_close_to_float64():
    check_close_to_float64(9, (4, 2), 64, "cpu")


@interpreter_test
def test_rope_store_interpreter_no_tokens():
    rotary = RotaryEmbedding(64, 16, 10000.0, None)
    q, k, v = make_qkv(0, 4, 2, 64, torch.float32, "cpu")
    cache = torch.zeros(2, 2, 8, 2, 64)
    got = rotary_and_store_kv(
        q, k, v, rotary.cos_cache, rotary.sin_cache, torch.empty(0, dtype=torch.long), cache,
        torch.empty(0, dtype=torch.long),
    )  # fmt: skip
    assert got.shape == (0, 4, 64) and not cache.any()


def test_rope_store_bad_arguments_raise():
    rotary = RotaryEmbedding(64, 16, 10000.0, None)
    q, k, v = make_qkv(3, 4, 2, 64, torch.float32, "cpu")
    pos, slots = torch.zeros(3, dtype=torch.long), torch.arange(3)
    cache = torch.zeros(2, 2, 8, 2, 64)

    def call(**kw):
        args = {"q": q, "k": k, "v": v, "positions": pos, "kv_cache": cache, "slot_mapping": slots}
        args.update(kw)
        rotary_and_store_kv(cos_cache=rotary.cos_cache, sin_cache=rotary.sin_cache, **args)

    with pytest.raises(ValueError, match="v must"):
        call(v=v.half())
    with pytest.raises(ValueError, match="kv_cache must be"):
        call(kv_cache=torch.zeros(2, 2, 8, 4, 64))
    with pytest.raises(ValueError, match="dtype"):
        call(kv_cache=cache.bfloat16())
    with pytest.raises(ValueError, match="laid out"):
        call(kv_cache=torch.zeros(2, 8, 2, 2, 64).transpose(1, 2))
    with pytest.raises(ValueError, match="slot_mapping"):
        call(slot_mapping=slots[:2])
    with pytest.raises(ValueError, match="positions"):
        call(positions=pos[:2])


# GPU tests: compiled kernel, real sizes, against the PyTorch path on the GPU.

GPU_MISMATCH = 1e-3


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", [(32, 8), (16, 16), (28, 4)])
@pytest.mark.parametrize("tokens", [1, 33, 4096, 8192])
def test_rope_store_gpu(dtype, head_dim, heads, tokens):
    # Expected bit-exact, as apply_rotary is; the bound is test_rotary_gpu's.
    check_rope_store(tokens, heads, head_dim, dtype, "cuda", max_ulp=1, max_mismatch=GPU_MISMATCH)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("tokens", [1, 8192])
def test_rope_store_gpu_bf16_close_to_float64(tokens, head_dim):
    check_close_to_float64(tokens, (32, 8), head_dim, "cuda")


@pytest.mark.gpu
@requires_cuda
def test_rope_store_in_cuda_graph():
    dtype, tokens, heads, head_dim = torch.bfloat16, 8, (32, 8), 64
    q, k, v = make_qkv(tokens, *heads, head_dim, dtype, "cuda", seed=4)
    rotary = RotaryEmbedding(head_dim, 1024, 500000.0, None).to("cuda")
    positions = torch.arange(100, 100 + tokens, device="cuda")
    slots = torch.arange(tokens, device="cuda") * 3
    cache = torch.zeros(2, 4, 16, heads[1], head_dim, dtype=dtype, device="cuda")
    q_out = torch.empty_like(q)

    def step() -> None:
        cache.zero_()
        rotary_and_store_kv(
            q, k, v, rotary.cos_cache, rotary.sin_cache, positions, cache, slots, q_out=q_out
        )

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    # New inputs after capture: the replay must read them, not what was there at capture.
    for t in (q, k, v):
        t.copy_(torch.randn_like(t))
    positions.add_(7)
    slots.add_(1)
    q_out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    ref_cache = torch.zeros_like(cache)
    ref_q = rotary_and_store_kv_ref(
        q, k, v, rotary.cos_cache, rotary.sin_cache, positions, ref_cache, slots
    )
    assert_matches(q_out, ref_q, max_ulp=1, max_mismatch=0.01, label="q")
    assert torch.equal(cache, ref_cache)
