"""What the paged attention kernels (``paged_prefill``, ``paged_decode``) share: how a
KV head's rows are addressed in the paged cache, the fp8 cache's dtype and scales, the input
checks, and the fitting of K/V tiles to a GPU's shared memory.

The paged KV cache is ``[num_blocks, block_size, Hkv, D]`` per K and V, read through
per-sequence block tables (see docs/INTERFACES.md). Both kernels run softmax online in float32
in base 2 (the scale is pre-multiplied by log2(e)).

An fp8 cache (``torch.float8_e4m3fn``) holds ``k / k_scale`` and ``v / v_scale`` (``kv_scale =
[k_scale, v_scale]``, float32, per layer). The kernels load its tiles as fp8 (half the bytes)
and widen them to q's dtype, which holds every e4m3 value exactly; the scales are applied in
float32 outside the dots: ``k_scale`` with the softmax scale, ``v_scale`` to the output.

CPU tensors work only under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is
first imported).
"""

from __future__ import annotations

import functools
import math

import torch
import triton

# Unused here, but the interpreter asserts that a jit function's globals hold it.
import triton.language as tl  # noqa: F401

from parallm.kernels.rope_store import check_kv_scale

LOG2E = math.log2(math.e)
FP8_KV = torch.float8_e4m3fn

# Where the device cannot be asked (the interpreter on CPU): an H100's shared memory a block
# may opt into (227 KiB) and SM count.
DEFAULT_SMEM_BYTES = 232448
DEFAULT_SMS = 132
# Left free beyond the estimated K/V stages and Q tile: Triton's own scratch (layout conversions
# of the score tile, reductions) comes out of the same shared memory.
SMEM_RESERVE_BYTES = 48 * 1024


@triton.jit
def page_rows(cache_ptr, pages, in_page, kv_head, stride_b, stride_t, stride_h, offs_d):
    """Pointers to one KV head's rows ``[N, BLOCK_D]`` of a K or V cache, given each key's
    page (int64) and offset in it (prefill and decode address the cache alike)."""
    return (cache_ptr + pages[:, None] * stride_b + in_page[:, None] * stride_t
            + kv_head * stride_h + offs_d[None, :])  # fmt: skip


def dot_precision(dtype: torch.dtype) -> str:
    # Plain fp32 stays exact (tests compare to 1e-3); tf32 is the NVIDIA default otherwise.
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def _cuda_properties(device_index: int):
    return torch.cuda.get_device_properties(device_index)


def _properties(device: torch.device):
    """The CUDA device's properties; None for another device, which then gets the defaults."""
    if device.type != "cuda":
        return None
    return _cuda_properties(
        device.index if device.index is not None else torch.cuda.current_device()
    )


def shared_memory_bytes(device: torch.device) -> int:
    """Shared memory one block of a kernel on ``device`` may use."""
    return getattr(_properties(device), "shared_memory_per_block_optin", DEFAULT_SMEM_BYTES)


def device_sms(device: torch.device) -> int:
    return getattr(_properties(device), "multi_processor_count", DEFAULT_SMS)


def check_paged_inputs(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_scale: torch.Tensor | None
) -> None:
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4:
        raise ValueError(
            f"k/v cache shapes differ or are not 4-D: {k_cache.shape}, {v_cache.shape}"
        )
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in (q.dtype, FP8_KV):
        raise ValueError(
            f"the k/v caches must both be in q's dtype {q.dtype} or {FP8_KV}, got "
            f"{k_cache.dtype} and {v_cache.dtype}"
        )
    check_kv_scale(k_cache, kv_scale)
    if q.dim() != 3 or q.shape[-1] != k_cache.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} does not match cache head dim {k_cache.shape[-1]}")
    if q.shape[1] % k_cache.shape[2] != 0:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k_cache.shape[2]}")
    page_size = k_cache.shape[1]
    if page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"block_size must be a power of two, got {page_size}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head) dim")


def output_buffer(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty_like(q)
    if out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} must match q {tuple(q.shape)}, unit last stride")
    return out


def kv_tiles_bytes(block_m: int, block_n: int, stages: int, block_d: int, elem_bytes: int) -> int:
    """Shared memory of a flash-attention loop: ``stages`` K and V tiles in flight, one Q tile."""
    return (2 * stages * block_n + block_m) * block_d * elem_bytes


def fit_kv_tiles(
    block_m: int, block_n: int, stages: int, block_d: int, elem_bytes: int, smem_bytes: int
) -> tuple[int, int]:
    """``(block_n, stages)`` shrunk until the tiles fit ``smem_bytes`` less Triton's scratch.

    The tuned bf16/fp16 tiles fit every Hopper GPU as they are; wider elements (float32) or
    smaller shared memories first halve the keys per tile (down to 16, tl.dot's minimum), then
    drop pipeline stages.
    """
    budget = smem_bytes - SMEM_RESERVE_BYTES
    while block_n > 16 and kv_tiles_bytes(block_m, block_n, stages, block_d, elem_bytes) > budget:
        block_n //= 2
    while stages > 1 and kv_tiles_bytes(block_m, block_n, stages, block_d, elem_bytes) > budget:
        stages -= 1
    return block_n, stages


def kernel_strides(
    q: torch.Tensor,
    out: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
) -> tuple[int, ...]:
    """Both kernels' stride arguments, in their order."""
    return (*q.stride()[:2], *out.stride()[:2], *k_cache.stride()[:3], *v_cache.stride()[:3],
            block_tables.stride(0))  # fmt: skip


def kv_scale_arg(k_cache: torch.Tensor, kv_scale: torch.Tensor | None) -> torch.Tensor:
    """The kernels' ``kv_scale_ptr``: the scales, or any pointer for a float cache (unread)."""
    return kv_scale if kv_scale is not None and k_cache.dtype == FP8_KV else k_cache
