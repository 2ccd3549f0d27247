"""Benchmark the fused Triton ops against the PyTorch compositions they replace (needs CUDA).

For each op and token count, checks the fused result against the PyTorch modules (max ulp
difference), then times both with ``triton.testing.do_bench`` (median, eager launches, so a
small T mostly measures launch count) and, with ``--graph``, also replayed in a CUDA graph
(``do_bench_cudagraph``, the way decode runs). GB/s counts the fused op's compulsory traffic.
``rope_store``'s baseline is PyTorch's rotary plus ``write_kv``, and its check covers the
whole KV cache as well as q.

    python benchmarks/fused_ops_bench.py [--model llama-3.1-8b] [--dtype fp16] [--graph]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parallm.kernels.elementwise import (  # noqa: E402
    fused_add_rms_norm,
    rms_norm,
    silu_and_mul,
)
from parallm.kernels.rope_store import rotary_and_store_kv  # noqa: E402
from parallm.layers.attention import write_kv  # noqa: E402
from parallm.layers.norm import RMSNorm  # noqa: E402
from parallm.layers.rotary import RotaryEmbedding  # noqa: E402

# hidden, intermediate, query heads, kv heads, head_dim, rope theta
MODELS = {
    "llama-3.2-1b": (2048, 8192, 32, 8, 64, 500000.0),
    "llama-3.1-8b": (4096, 14336, 32, 8, 128, 500000.0),
    "qwen3-0.6b": (1024, 3072, 16, 8, 128, 1000000.0),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EPS = 1e-5


@dataclass
class Case:
    op: str
    torch_fn: Callable[[], object]
    fused_fn: Callable[[], object]
    bytes_moved: int
    # What to compare after one call of each: (fused, torch) outputs; default their results.
    results: Callable[[], tuple[object, object]] | None = None

    def outputs(self) -> tuple[object, object]:
        if self.results is not None:
            return self.results()
        return self.fused_fn(), self.torch_fn()


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def norm_cases(tokens: int, hidden: int, dtype: torch.dtype) -> Iterator[Case]:
    x = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
    residual = torch.randn_like(x)
    norm = RMSNorm(hidden, EPS).to("cuda", dtype)
    norm.weight.data.normal_()
    w = norm.weight.detach()
    yield Case("rms_norm", lambda: norm(x), lambda: rms_norm(x, w, EPS), 2 * _nbytes(x))

    def torch_add_norm():
        new_residual = residual + x
        return norm(new_residual), new_residual

    yield Case(
        "add_rms_norm",
        torch_add_norm,
        lambda: fused_add_rms_norm(x, residual, w, EPS),
        4 * _nbytes(x),
    )


def head_norm_case(tokens: int, model: tuple, dtype: torch.dtype) -> Case:
    """Qwen3's per-head q norm: tokens x query heads rows of head_dim elements each."""
    _, _, num_q_heads, _, head_dim, _ = model
    q = torch.randn(tokens, num_q_heads, head_dim, device="cuda", dtype=dtype)
    norm = RMSNorm(head_dim, EPS).to("cuda", dtype)
    norm.weight.data.normal_()
    w = norm.weight.detach()
    return Case("head_norm", lambda: norm(q), lambda: rms_norm(q, w, EPS), 2 * _nbytes(q))


def silu_case(tokens: int, inter: int, dtype: torch.dtype) -> Case:
    gate_up = torch.randn(tokens, 2 * inter, device="cuda", dtype=dtype)

    def torch_fn():
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    return Case("silu_and_mul", torch_fn, lambda: silu_and_mul(gate_up), 3 * _nbytes(gate_up) // 2)


def rope_store_case(tokens: int, model: tuple, dtype: torch.dtype, block_size: int = 16) -> Case:
    """Rotary + KV-cache store: the fused kernel against PyTorch's rotary then write_kv. Each
    writes its own cache, so both can be checked."""
    _, _, num_q_heads, num_kv_heads, head_dim, theta = model
    rotary = RotaryEmbedding(head_dim, 8192, theta, None).to("cuda")
    widths = [num_q_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    qkv = torch.randn(tokens, sum(widths), device="cuda", dtype=dtype)
    q, k, v = (x.view(tokens, -1, head_dim) for x in qkv.split(widths, dim=-1))
    positions = torch.randint(0, 8192, (tokens,), device="cuda")
    # Distinct slots scattered over a cache twice the step's size, as a paged cache has them.
    num_blocks = 2 * triton.cdiv(tokens, block_size)
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:tokens]
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    caches = [torch.zeros(shape, device="cuda", dtype=dtype) for _ in range(2)]
    cos, sin = rotary.cos_cache, rotary.sin_cache

    def torch_fn() -> torch.Tensor:
        q_rot, k_rot = rotary(positions, q, k)
        write_kv(k_rot, v, caches[0], slots)
        return q_rot

    def fused_fn() -> torch.Tensor:
        return rotary_and_store_kv(q, k, v, cos, sin, positions, caches[1], slots)

    def results() -> tuple[object, object]:
        fused_q, torch_q = fused_fn(), torch_fn()
        return (fused_q, caches[1]), (torch_q, caches[0])

    # q read and written, k and v read and written once each; positions/slots are noise.
    return Case("rope_store", torch_fn, fused_fn, 2 * _nbytes(q, k, v), results)


def max_ulp(out: object, ref: object) -> int:
    """Largest difference in ulp over (a tuple of) outputs of the same dtype."""
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    worst = 0
    for a, b in zip(outs, refs, strict=True):
        width = torch.finfo(a.dtype).bits
        ints = {16: torch.int16, 32: torch.int32}[width]
        ia, ib = (t.contiguous().view(ints).long() for t in (a, b))
        ia, ib = (torch.where(i < 0, -(2 ** (width - 1)) - i, i) for i in (ia, ib))
        worst = max(worst, int((ia - ib).abs().max().item()))
    return worst


def time_ms(fn: Callable[[], object], graph: bool) -> float:
    if graph:
        return triton.testing.do_bench_cudagraph(fn)
    return triton.testing.do_bench(fn)


def run(model_name: str, dtype: torch.dtype, tokens_list: list[int], graph: bool) -> None:
    model = MODELS[model_name]
    hidden, inter = model[0], model[1]
    header = f"{'op':<14}{'T':>6}{'torch ms':>11}{'fused ms':>11}{'speedup':>9}{'GB/s':>8}"
    if graph:
        header += f"{'torch graph':>13}{'fused graph':>13}{'speedup':>9}"
    print(f"{model_name} {dtype}\n{header}\n{'-' * len(header)}")
    for tokens in tokens_list:
        cases = [*norm_cases(tokens, hidden, dtype), head_norm_case(tokens, model, dtype)]
        cases.append(silu_case(tokens, inter, dtype))
        cases.append(rope_store_case(tokens, model, dtype))
        for case in cases:
            ulp = max_ulp(*case.outputs())
            t_torch, t_fused = time_ms(case.torch_fn, False), time_ms(case.fused_fn, False)
            gbps = case.bytes_moved / (t_fused * 1e-3) / 1e9
            line = f"{case.op:<14}{tokens:>6}{t_torch:>11.4f}{t_fused:>11.4f}"
            line += f"{t_torch / t_fused:>8.2f}x{gbps:>8.0f}"
            if graph:
                g_torch, g_fused = time_ms(case.torch_fn, True), time_ms(case.fused_fn, True)
                line += f"{g_torch:>13.4f}{g_fused:>13.4f}{g_torch / g_fused:>8.2f}x"
            print(f"{line}   (max diff {ulp} ulp)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="llama-3.2-1b")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 32, 256, 4096])
    parser.add_argument("--graph", action="store_true", help="also time CUDA graph replays")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    torch.manual_seed(0)
    run(args.model, DTYPES[args.dtype], args.tokens, args.graph)


if __name__ == "__main__":
    main()
