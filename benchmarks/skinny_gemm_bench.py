"""Benchmark the Triton skinny GEMM against cuBLAS (F.linear) at decode batch sizes (needs CUDA).

For every projection of Llama-3.2-1B and Llama-3.1-8B (fused q/k/v, o_proj, fused gate/up,
down_proj, LM head) and each batch M, times F.linear and ``skinny_linear`` replayed in a CUDA
graph (``triton.testing.do_bench_cudagraph``, mean of 10 replays), first with the heuristic's
configuration, then every alternative from ``candidate_configs``. TB/s is weight bytes / time.
Each timed graph cycles through copies of the weight that add up to more than L2 (50 MB on an
H100), so W comes from HBM as in a real decode step, where 16-32 other layers' weights pass
between two uses of one. Errors are norm-wise, against F.linear in float32.

The summary adds each model's projections up to one decode step's GEMM time (layers x the
per-layer shapes + the LM head) for cuBLAS, the heuristic, and the best configuration per
shape: the number that decides whether to wire the kernel in.

    python benchmarks/skinny_gemm_bench.py [--models 1b 8b] [--m 1 4 8 16] [--no-sweep]
        [--dtype bf16] [--rep 10] [--out skinny_gemm.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parallm.layers.skinny_gemm import (  # noqa: E402
    candidate_configs,
    skinny_config,
    skinny_linear,
)

# model -> (layers, {projection: (N, K)}); hidden, intermediate, heads x head_dim, vocab.
MODELS = {
    "1b": (
        16,
        {
            "qkv": (2048 + 2 * 8 * 64, 2048),
            "o": (2048, 2048),
            "gate_up": (2 * 8192, 2048),
            "down": (2048, 8192),
            "lm_head": (128256, 2048),
        },
    ),
    "8b": (
        32,
        {
            "qkv": (4096 + 2 * 8 * 128, 4096),
            "o": (4096, 4096),
            "gate_up": (2 * 14336, 4096),
            "down": (4096, 14336),
            "lm_head": (128256, 4096),
        },
    ),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
L2_DEFEAT_BYTES = 256 << 20  # weight copies per timed graph: several times the 50 MB L2


def time_us(fn: Callable[[], object], rep: int) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=rep) * 1e3


def rotating(weights: list[torch.Tensor], call: Callable[[torch.Tensor], object]):
    """fn() calling ``call`` on the next weight copy each time (a captured graph unrolls the
    calls, so consecutive replayed calls read different copies)."""
    state = {"i": 0}

    def fn() -> object:
        state["i"] = (state["i"] + 1) % len(weights)
        return call(weights[state["i"]])

    return fn


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def bench_shape(model, layer, n, k, ms, dtype, sms, sweep, rep) -> list[dict]:
    w = torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5
    nbytes = w.numel() * w.element_size()
    weights = [w] + [w.clone() for _ in range(max(0, triton.cdiv(L2_DEFEAT_BYTES, nbytes) - 1))]
    w32 = w.float()
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = F.linear(x.float(), w32)
        configs = (
            candidate_configs(m, n, k, sms) if sweep else {"heuristic": skinny_config(m, n, k, sms)}
        )
        row = {"model": model, "layer": layer, "n": n, "k": k, "m": m, "weight_bytes": nbytes}
        row["cublas_us"] = time_us(rotating(weights, lambda wt, x=x: F.linear(x, wt)), rep)
        row["cublas_err"] = rel_err(F.linear(x, w), ref)
        row["configs"] = {}
        for name, cfg in configs.items():
            err = rel_err(skinny_linear(x, w, None, cfg), ref)
            fn = rotating(weights, lambda wt, x=x, cfg=cfg: skinny_linear(x, wt, None, cfg))
            us = time_us(fn, rep)
            row["configs"][name] = {**dataclasses.asdict(cfg), "us": us, "err": err}
        row["best"] = min(row["configs"], key=lambda c: row["configs"][c]["us"])
        rows.append(row)
        print_row(row, nbytes)
    return rows


def tbps(nbytes: int, us: float) -> float:
    return nbytes / (us * 1e-6) / 1e12


def describe(c: dict) -> str:
    path = "dot" if c["use_dot"] else "fma"
    return f"{path} {c['block_n']}x{c['block_k']} split {c['split_k']} w{c['num_warps']}"


def print_row(row: dict, nbytes: int) -> None:
    h, best = row["configs"]["heuristic"], row["configs"][row["best"]]
    line = f"{row['model']:<3}{row['layer']:<8}{row['n']:>7}{row['k']:>6}{row['m']:>3}"
    line += f"{nbytes / 1e6:>7.1f}{row['cublas_us']:>9.1f}{tbps(nbytes, row['cublas_us']):>6.2f}"
    line += f"{h['us']:>9.1f}{tbps(nbytes, h['us']):>6.2f}{row['cublas_us'] / h['us']:>7.2f}x"
    line += f"{row['cublas_us'] / best['us']:>7.2f}x  {row['best']:<9} {describe(h)}"
    line += f"  err {h['err']:.1e} (cuBLAS {row['cublas_err']:.1e})"
    print(line, flush=True)
    if len(row["configs"]) > 1:
        alts = ", ".join(f"{name} {c['us']:.1f}" for name, c in row["configs"].items())
        print(f"{'':<27}sweep us: {alts}", flush=True)


def summarize(rows: list[dict], ms: list[int]) -> dict:
    """Per model and M: one decode step's projections (layers x per-layer + the LM head)."""
    summary = {}
    for model, (layers, shapes) in MODELS.items():
        for m in ms:
            sel = [r for r in rows if r["model"] == model and r["m"] == m]
            if len(sel) != len(shapes):
                continue
            totals = {"cublas": 0.0, "heuristic": 0.0, "best": 0.0, "best_of_both": 0.0}
            for r in sel:
                times = {
                    "cublas": r["cublas_us"],
                    "heuristic": r["configs"]["heuristic"]["us"],
                    "best": r["configs"][r["best"]]["us"],
                }
                times["best_of_both"] = min(times["cublas"], times["best"])
                mult = 1 if r["layer"] == "lm_head" else layers
                for key, us in times.items():
                    totals[key] += mult * us
            summary[f"{model} M={m}"] = totals
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--m", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--rep", type=int, default=10, help="ms of calls per timed graph")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("skinny_gemm_bench.py needs a CUDA GPU: torch.cuda.is_available() is False")
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    dtype, start = DTYPES[args.dtype], time.perf_counter()
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
          f"triton {triton.__version__}, {args.dtype}; us per call in a CUDA graph")  # fmt: skip
    header = f"{'':<3}{'layer':<8}{'N':>7}{'K':>6}{'M':>3}{'MB':>7}{'cuBLAS':>9}{'TB/s':>6}"
    header += f"{'triton':>9}{'TB/s':>6}{'speedup':>8}{'best':>8}  best cfg  heuristic cfg"
    print(f"{header}\n{'-' * len(header)}")
    rows = []
    for model in args.models:
        for layer, (n, k) in MODELS[model][1].items():
            sms = props.multi_processor_count
            rows += bench_shape(model, layer, n, k, args.m, dtype, sms, args.sweep, args.rep)
            torch.cuda.empty_cache()
    summary = summarize(rows, args.m)
    print("\nGEMM time per decode step, us (layers x projections + LM head):")
    print(f"{'':<10}{'cuBLAS':>10}{'heuristic':>11}{'best cfg':>10}{'min(both)':>11}")
    for key, t in summary.items():
        print(f"{key:<10}{t['cublas']:>10.0f}{t['heuristic']:>11.0f}{t['best']:>10.0f}"
              f"{t['best_of_both']:>11.0f}")  # fmt: skip
    print(f"\n{time.perf_counter() - start:.0f} s")
    if args.out:
        meta = {"device": props.name, "sms": props.multi_processor_count, "dtype": args.dtype}
        meta |= {"torch": torch.__version__, "triton": triton.__version__, "rep_ms": args.rep}
        doc = {**meta, "results": rows, "summary": summary}
        args.out.write_text(json.dumps(doc, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
