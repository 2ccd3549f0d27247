"""Batch-1 GEMVs over quantized weights against the same GEMVs over 16-bit ones (needs CUDA).

For each projection of a decoder layer (Llama-3.1-8B or Llama-3.2-1B shapes: q/k/v and gate/up
after add+RMSNorm, down after SiLU-mul, o with no prologue) and each weight kind (bf16, int8,
fp8 e4m3 with per-row scales), the time per call of ``parallm.kernels.gemv`` inside a CUDA
graph that cycles through copies of the weight larger than L2 together (so W streams from HBM,
as in a decode step), with the achieved weight bandwidth and the speed-up over bf16 at the
default tile. ``--sweep`` also times a grid of tiles per quantized GEMV and prints the best:
the one-byte defaults (``gemv.role_tile``) came from the plain GEMV's sweep
(``quant_gemv_variants.py``) and, for q/k/v, this sweep with the norm prologue.

Each swept tile's time prints as it is measured, so a sweep cut short still reports what it
reached; ``--roles`` and ``--kinds`` narrow it (about 30 tiles a role and kind).

python benchmarks/quant_gemv_bench.py [--model 8b|1b] [--sweep] [--roles gate_up,qkv]
    [--kinds fp8] [--out quant_gemv.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parallm.bench.common import cuda_ms_per_call  # noqa: E402
from parallm.kernels.gemv import gemv, rms_norm_gemv, silu_mul_gemv  # noqa: E402
from parallm.layers.quantization import WEIGHT_FORMATS  # noqa: E402

# role: (N, K, prologue) per model shape
SHAPES = {
    "8b": {"qkv": (6144, 4096, "norm"), "o": (4096, 4096, "plain"),
           "gate_up": (28672, 4096, "norm"), "down": (4096, 14336, "silu")},
    "1b": {"qkv": (3072, 2048, "norm"), "o": (2048, 2048, "plain"),
           "gate_up": (16384, 2048, "norm"), "down": (2048, 8192, "silu")},
}  # fmt: skip
KINDS = ("bf16", "int8", "fp8")
# Tiles whose three one-byte W stages fit the GEMVs' shared-memory budget (gemv._SMEM_BUDGET).
SWEEP = [
    {"block_n": bn, "block_k": bk, "num_warps": w}
    for bn, bk, w in itertools.product([4, 8, 16, 32], [512, 1024, 2048, 4096], [4, 8])
    if 3 * bn * bk <= 200 * 1024
]
L2_BYTES = 64 << 20  # copies of W until they exceed this many bytes, so W comes from HBM
EPS = 1e-5


def _weights(
    n: int, k: int, kind: str, copies: int
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    w = torch.randn(n, k, device="cuda") / k**0.5
    if kind == "bf16":
        return [(w.to(torch.bfloat16).clone(), None) for _ in range(copies)]
    q, scale = WEIGHT_FORMATS[kind].quantize(w)
    return [(q.clone(), scale.clone()) for _ in range(copies)]


def _call(prologue: str, n: int, k: int) -> Callable[..., torch.Tensor]:
    """The role's GEMV as ``f(weight, scale, **tile)`` on fixed bf16 inputs."""
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    norm_w = torch.ones(k, device="cuda", dtype=torch.bfloat16)
    gate_up = torch.randn(1, 2 * k, device="cuda", dtype=torch.bfloat16)
    if prologue == "norm":
        return lambda w, s, **t: rms_norm_gemv(x, res, norm_w, w, EPS, weight_scale=s, **t)[0]
    if prologue == "silu":
        return lambda w, s, **t: silu_mul_gemv(gate_up, w, weight_scale=s, **t)
    return lambda w, s, **t: gemv(x, w, weight_scale=s, **t)


def time_us(fn: Callable[..., torch.Tensor], weights: list, tile: dict) -> float:
    """Microseconds per call, replaying a graph of one call per weight copy."""
    for w, s in weights:  # compile and warm up outside the capture
        fn(w, s, **tile)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w, s in weights:
            fn(w, s, **tile)
    graph.replay()
    return cuda_ms_per_call(graph.replay, 20) * 1e3 / len(weights)


def bench(model: str, sweep: bool, roles: list[str], kinds: list[str]) -> list[dict]:
    rows = []
    for role, (n, k, prologue) in SHAPES[model].items():
        if role not in roles:
            continue
        fn = _call(prologue, n, k)
        base = None
        for kind in ("bf16", *kinds):  # bf16 first: the speed-ups' base
            size = 1 if kind != "bf16" else 2
            weights = _weights(n, k, kind, max(2, L2_BYTES // (n * k * size) + 1))
            us = time_us(fn, weights, {})
            base = base or us
            row = {"model": model, "role": role, "n": n, "k": k, "weights": kind,
                   "tile": "default", "us": us, "gb_s": n * k * size / us / 1e3,
                   "speedup_vs_bf16": base / us}  # fmt: skip
            rows.append(row)
            print(f"{model} {role:8s} {kind:5s} default  {us:8.2f} us {row['gb_s']:7.0f} GB/s "
                  f"{row['speedup_vs_bf16']:.2f}x bf16")  # fmt: skip
            if sweep and kind != "bf16":
                timed = []
                for tile in SWEEP:
                    timed.append((time_us(fn, weights, tile), tile))
                    print(f"{model} {role:8s} {kind:5s} {tile}  {timed[-1][0]:8.2f} us",
                          flush=True)  # fmt: skip
                best_us, best = min(timed, key=lambda t: t[0])
                rows.append({**row, "tile": best, "us": best_us,
                             "gb_s": n * k * size / best_us / 1e3,
                             "speedup_vs_bf16": base / best_us})  # fmt: skip
                print(f"{model} {role:8s} {kind:5s} best {best}  {best_us:8.2f} us "
                      f"{base / best_us:.2f}x bf16")  # fmt: skip
            del weights
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=list(SHAPES), default="8b",
                        help="layer shapes: Llama-3.1-8B or Llama-3.2-1B (default: 8b)")  # fmt: skip
    parser.add_argument("--sweep", action="store_true",
                        help="also sweep tiles for the quantized GEMVs (default: off)")  # fmt: skip
    parser.add_argument("--roles", type=comma_list(list(SHAPES["8b"])), default=list(SHAPES["8b"]),
                        help="projections to time, comma-separated (default: all)")  # fmt: skip
    parser.add_argument("--kinds", type=comma_list(list(KINDS[1:])), default=list(KINDS[1:]),
                        help="one-byte kinds beside bf16, comma-separated (default: int8,fp8)")  # fmt: skip
    parser.add_argument("--out", default=None, help="write the rows as JSON here (default: none)")
    return parser


def comma_list(choices: list[str]) -> Callable[[str], list[str]]:
    """An argparse type: comma-separated names, each one of ``choices``."""

    def parse(text: str) -> list[str]:
        items = [t for t in text.split(",") if t]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{bad or text!r}: allowed {', '.join(choices)}")
        return items

    return parse


def main() -> None:
    args = build_parser().parse_args()
    if not torch.cuda.is_available():
        sys.exit("quant_gemv_bench.py needs a CUDA GPU")
    rows = bench(args.model, args.sweep, args.roles, args.kinds)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
