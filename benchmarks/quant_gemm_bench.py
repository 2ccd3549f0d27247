"""Time the quantized linear layers' GEMM paths against the float GEMM (CPU or CUDA).

For each shape ``[M, K] x [N, K]^T`` and activation dtype it prints the median time of: the
float ``F.linear``; the dequantize reference (``dequantized_linear``); int8
``torch._weight_int8pack_mm`` (``int8pack_linear``); fp8 ``torch._scaled_mm`` with per-token
activations (``scaled_mm_linear``); on CUDA the Triton kernels that read the quantized weight
(the GEMV for one row, the few-rows GEMM up to 64 rows; None past that); and the path each
format picks (``WeightFormat.linear``). Each quantized result's relative error
against the float GEMM over the dequantized weight comes with it, so speed is read next to
accuracy.

    OMP_NUM_THREADS=1 python benchmarks/quant_gemm_bench.py [--device cpu] [--dtype bf16]
        [--shapes 1x2048x2048,16x2048x2048,...] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parallm.layers.quantization import WEIGHT_FORMATS  # noqa: E402
from parallm.layers.quantization.format import (  # noqa: E402
    dequantized_linear,
    triton_weight_only_linear,
)
from parallm.layers.quantization.fp8 import scaled_mm_linear  # noqa: E402
from parallm.layers.quantization.int8 import int8pack_linear  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_SHAPES = "1x2048x2048,1x8192x2048,16x2048x2048,128x2048x2048,1x4096x4096,16x4096x4096"


def median_seconds(fn: Callable[[], torch.Tensor], device: torch.device, budget: float) -> float:
    """Median of repeated calls, for about ``budget`` seconds after a warm-up."""
    fn()
    times = []
    deadline = time.perf_counter() + budget
    while time.perf_counter() < deadline or len(times) < 5:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def bench_shape(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device,
                budget: float) -> list[dict]:  # fmt: skip
    g = torch.Generator().manual_seed(m + n + k)
    x = torch.randn(m, k, generator=g).to(dtype).to(device)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype).to(device)
    rows = [_row("float F.linear", m, n, k, dtype, median_seconds(lambda: F.linear(x, w),
                                                                 device, budget), None)]  # fmt: skip
    for method, fmt in WEIGHT_FORMATS.items():
        q, scale = fmt.quantize(w)
        want = F.linear(x.float(), fmt.dequantize(q, scale, torch.float32))
        paths = {f"{method} dequantize": dequantized_linear, f"{method} picked": fmt.linear}
        if method == "int8" and device.type == "cpu":
            paths[f"{method} _weight_int8pack_mm"] = int8pack_linear
        if method == "fp8" and (device.type == "cpu" or _has_fp8_mma(device)):
            paths[f"{method} _scaled_mm per-token"] = scaled_mm_linear
        if device.type == "cuda" and (method == "int8" or _has_fp8_mma(device)):
            paths[f"{method} Triton weight-only"] = triton_weight_only_linear
        for name, path in paths.items():
            try:
                got = path(x, q, scale, None)
                if got is None:  # the Triton kernels past their row count
                    continue
                seconds = median_seconds(
                    lambda p=path, q=q, s=scale: p(x, q, s, None), device, budget
                )
            except RuntimeError as e:  # a path this torch/device lacks
                print(f"  {name}: {str(e).splitlines()[0]}")
                continue
            rel = float((got.float() - want).norm() / want.norm())
            rows.append(_row(name, m, n, k, dtype, seconds, rel))
    return rows


def _has_fp8_mma(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _row(name, m, n, k, dtype, seconds, rel):
    return {"path": name, "m": m, "n": n, "k": k, "dtype": str(dtype).replace("torch.", ""),
            "us": seconds * 1e6, "rel_err": rel}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to run")  # fmt: skip
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16",
                        help="activation dtype")  # fmt: skip
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated MxNxK")
    parser.add_argument("--seconds", type=float, default=0.5, help="timing budget per path")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    results = []
    for shape in args.shapes.split(","):
        m, n, k = (int(v) for v in shape.split("x"))
        rows = bench_shape(m, n, k, dtype, device, args.seconds)
        base = rows[0]["us"]
        for r in rows:
            err = "" if r["rel_err"] is None else f"  rel err {r['rel_err']:.2e}"
            print(f"{m}x{n}x{k} {r['dtype']:9s} {r['path']:32s} {r['us']:10.1f} us "
                  f"({base / r['us']:.2f}x float){err}")  # fmt: skip
        results += rows
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
