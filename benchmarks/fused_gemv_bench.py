"""Batch-1 GEMVs of ``parallm.kernels.gemv`` against cuBLAS (needs CUDA).

For the Llama-3.2-1B batch-1 shapes: q/k/v and gate/up after add+RMSNorm, down after SiLU-mul,
o and the LM head with no prologue. Times, per call, in a CUDA graph that cycles through copies
of the weight larger than L2 together (so W comes from HBM, as in a decode step):
  unfused   the Triton norm (or SiLU-mul) kernel, then F.linear (cuBLAS);
  fused     ``parallm.kernels.gemv`` over a sweep of tile configurations.
Then the chain of one layer's four GEMVs over 16 layers' distinct weights, launched plainly and
with programmatic dependent launch (``parallm.kernels.pdl``): what PDL buys the GEMVs alone.

python benchmarks/fused_gemv_bench.py [--out fused_gemv.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parallm.bench.common import cuda_ms_per_call  # noqa: E402
from parallm.kernels import pdl  # noqa: E402
from parallm.kernels.elementwise import fused_add_rms_norm, silu_and_mul  # noqa: E402
from parallm.kernels.gemv import gemv, rms_norm_gemv, silu_mul_gemv  # noqa: E402

SHAPES = {
    "qkv": (3072, 2048, "norm"),
    "gate_up": (16384, 2048, "norm"),
    "down": (2048, 8192, "silu"),
    "o": (2048, 2048, "plain"),
    "lm_head": (128256, 2048, "plain"),
}
CONFIGS = [
    dict(block_n=bn, block_k=bk, num_warps=w, num_stages=s)
    for bn, bk, w, s in itertools.product([8, 16, 32], [256, 512, 1024], [4, 8], [3])
]
EPS = 1e-5
# Tiles (block_n, block_k, num_warps) tried per GEMV inside the PDL chain (--chain-sweep), the
# default (parallm.kernels.gemv's *_TILE) first. Alone, a GEMV's best tile is the one that
# streams fastest; in the chain, what a CTA loads before its PDL wait also counts.
CHAIN_TILES = {
    "qkv": [(8, 1024, 4), (8, 1024, 8), (16, 1024, 8), (4, 1024, 4), (8, 512, 4), (4, 2048, 4)],
    "o": [(4, 2048, 4), (2, 2048, 4), (4, 2048, 2), (4, 1024, 4), (2, 2048, 2), (8, 1024, 4)],
    "gate_up": [(32, 256, 4), (32, 256, 8), (64, 256, 8), (32, 512, 8), (16, 256, 4), (64, 128, 4)],
    "down": [
        (16, 1024, 8),
        (16, 2048, 8),
        (32, 1024, 8),
        (16, 1024, 4),
        (32, 512, 8),
        (8, 1024, 4),
    ],
}


def time_per_call(calls: list[Callable[[], object]], reps: int = 20) -> float:
    """Microseconds per call: the calls captured in one graph, replayed ``reps`` times."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    return cuda_ms_per_call(graph.replay, reps) * 1e3 / len(calls)


def bench_shape(name: str, n: int, k: int, kind: str) -> dict:
    dev, dt = "cuda", torch.bfloat16
    copies = max(2, -(-256 * 2**20 // (n * k * 2)))
    weights = [torch.randn(n, k, device=dev, dtype=dt) / k**0.5 for _ in range(copies)]
    x = torch.randn(1, k, device=dev, dtype=dt)
    res = torch.randn(1, k, device=dev, dtype=dt)
    norm_w = 1 + 0.1 * torch.randn(k, device=dev, dtype=dt)
    gate_up = torch.randn(1, 2 * k, device=dev, dtype=dt)
    if kind == "norm":

        def unfused(w):
            h, _ = fused_add_rms_norm(x, res, norm_w, EPS)
            return F.linear(h, w)

        def fused(w, cfg):
            return rms_norm_gemv(x, res, norm_w, w, EPS, **cfg)[0]
    elif kind == "plain":

        def unfused(w):
            return F.linear(x, w)

        def fused(w, cfg):
            return gemv(x, w, **cfg)
    else:

        def unfused(w):
            return F.linear(silu_and_mul(gate_up), w)

        def fused(w, cfg):
            return silu_mul_gemv(gate_up, w, **cfg)

    row = {"shape": name, "n": n, "k": k, "mb": n * k * 2 / 1e6}
    row["unfused_us"] = time_per_call([lambda w=w: unfused(w) for w in weights])
    ref = unfused(weights[0]).float()
    row["fused"] = []
    for cfg in CONFIGS:
        out = fused(weights[0], cfg).float()
        err = float((out - ref).norm() / ref.norm())
        us = time_per_call([lambda w=w, c=cfg: fused(w, c) for w in weights])
        row["fused"].append({**cfg, "us": us, "rel_err": err})
    best = min(row["fused"], key=lambda r: r["us"])
    row["best_fused_us"], row["best_config"] = best["us"], best
    print(f"{name:>8} ({n}x{k}, {row['mb']:.1f} MB): unfused {row['unfused_us']:.2f} us "
          f"({row['mb'] / row['unfused_us']:.2f} TB/s), best fused {best['us']:.2f} us "
          f"({row['mb'] / best['us']:.2f} TB/s) with {best}", flush=True)  # fmt: skip
    return row


def bench_chain(layers: int = 16, sweep: bool = False) -> dict:
    """One decode layer's four GEMVs (no attention) over ``layers`` layers' weights."""
    dev, dt = "cuda", torch.bfloat16
    hidden, inter = 2048, 8192
    shapes = [(3072, hidden), (hidden, hidden), (2 * inter, hidden), (hidden, inter)]
    weights = [[torch.randn(n, k, device=dev, dtype=dt) / k**0.5 for n, k in shapes]
               for _ in range(layers)]  # fmt: skip
    norm_w = 1 + 0.1 * torch.randn(hidden, device=dev, dtype=dt)
    x = torch.randn(1, hidden, device=dev, dtype=dt)

    def step(stages: int = 3, tiles: dict[str, dict] | None = None, on: bool = True):
        """The chain; ``on``: launch with PDL."""
        t = {role: {"pdl": on, **(tiles or {}).get(role, {})} for role in CHAIN_TILES}
        h, res = x, None
        for w_qkv, w_o, w_up, w_down in weights:
            qkv, summed = rms_norm_gemv(h, res, norm_w, w_qkv, EPS, num_stages=stages, **t["qkv"])
            res = h if res is None else summed
            o = gemv(qkv[:, :hidden], w_o, num_stages=stages, **t["o"])
            gate_up, res = rms_norm_gemv(o, res, norm_w, w_up, EPS, num_stages=stages,
                                         **t["gate_up"])  # fmt: skip
            h = silu_mul_gemv(gate_up, w_down, num_stages=stages, **t["down"])
        return h

    if sweep:
        return _sweep_chain_tiles(step, layers, sum(w.numel() * 2 for ws in weights for w in ws))

    mb = sum(w.numel() * 2 for ws in weights for w in ws) / 1e6
    row = {"layers": layers, "mb": mb, "pdl_supported": pdl._SUPPORTED}
    variants = [("off", False, 3), ("pdl", True, 3)]
    variants += [(f"stages {n}", True, n) for n in (2, 4, 5)]
    for name, on, stages in variants:
        row[f"{name}_us"] = us = time_per_call([lambda n=stages, o=on: step(n, on=o)], reps=50)
        print(f"chain of {layers} layers' GEMVs ({mb:.0f} MB), {name:>9} (PDL {on}, "
              f"{stages} stages): {us:.1f} us ({mb / us:.2f} TB/s)", flush=True)  # fmt: skip
    return row


def _sweep_chain_tiles(step: Callable, layers: int, nbytes: int) -> dict:
    """Each GEMV's tiles in turn, the others at their defaults; then the best of each together."""
    mb, rows, best = nbytes / 1e6, [], {}
    base = time_per_call([step], reps=50)
    print(f"chain sweep: defaults {base:.1f} us ({mb / base:.2f} TB/s)", flush=True)
    for role, tiles in CHAIN_TILES.items():
        for bn, bk, w in tiles:
            cfg = dict(block_n=bn, block_k=bk, num_warps=w)
            us = time_per_call([lambda c={role: cfg}: step(tiles=c)], reps=50)
            rows.append({"role": role, **cfg, "us": us})
            print(f"  {role:>7} {bn:>2} x {bk:>4}, {w} warps: {us:.1f} us", flush=True)
        best[role] = min((r for r in rows if r["role"] == role), key=lambda r: r["us"])
    combo = {role: {k: r[k] for k in ("block_n", "block_k", "num_warps")}
             for role, r in best.items()}  # fmt: skip
    both = time_per_call([lambda: step(tiles=combo)], reps=50)
    print(f"chain sweep: best of each {combo}: {both:.1f} us ({mb / both:.2f} TB/s)")
    return {"layers": layers, "mb": mb, "default_us": base, "rows": rows, "best": combo,
            "best_us": both, "lm_head": _sweep_lm_head()}  # fmt: skip


def _sweep_lm_head() -> dict:
    """The step's tail after the last down GEMV: the final add+RMSNorm then the LM head GEMV,
    against the norm fused into the LM head (``rms_norm_gemv``) at several tiles, with PDL."""
    dev, dt = "cuda", torch.bfloat16
    n, k = SHAPES["lm_head"][:2]
    w_down = torch.randn(k, 8192, device=dev, dtype=dt) / 8192**0.5
    w_head = torch.randn(n, k, device=dev, dtype=dt) / k**0.5
    gate_up = torch.randn(1, 16384, device=dev, dtype=dt)
    res = torch.randn(1, k, device=dev, dtype=dt)
    norm_w = 1 + 0.1 * torch.randn(k, device=dev, dtype=dt)
    out = {}

    def separate():
        h = silu_mul_gemv(gate_up, w_down, pdl=True)
        h, _ = fused_add_rms_norm(h, res, norm_w, EPS, pdl=True)
        return gemv(h, w_head, pdl=True)

    def fused(bn: int, bk: int) -> torch.Tensor:
        h = silu_mul_gemv(gate_up, w_down, pdl=True)
        return rms_norm_gemv(h, res, norm_w, w_head, EPS, block_n=bn, block_k=bk, pdl=True)[0]

    want = separate().float()
    out["separate_us"] = time_per_call([separate], reps=50)
    print(f"tail (down, norm, LM head): separate norm {out['separate_us']:.1f} us", flush=True)
    for bn, bk in [(8, 1024), (16, 1024), (32, 1024), (16, 2048)]:
        err = float((fused(bn, bk).float() - want).norm() / want.norm())
        us = time_per_call([lambda a=bn, b=bk: fused(a, b)], reps=50)
        out[f"fused_{bn}x{bk}_us"] = us
        print(f"  norm in the LM head, {bn} x {bk}: {us:.1f} us (rel err {err:.1e})", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--chain-only", action="store_true", help="only the 16-layer GEMV chain")
    ap.add_argument("--chain-sweep", action="store_true",
                    help="only the chain, sweeping each GEMV's tile (with PDL)")  # fmt: skip
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.chain_sweep:
        result = bench_chain(sweep=True)
        if args.out:
            Path(args.out).write_text(json.dumps({"chain_sweep": result}, indent=1))
        return
    chain = bench_chain()
    if args.chain_only:
        return
    rows = [bench_shape(name, *shape) for name, shape in SHAPES.items()]
    layer_rows = [r for r in rows if r["shape"] != "lm_head"]
    unfused = 16 * sum(r["unfused_us"] for r in layer_rows)
    fused = 16 * sum(min(r["unfused_us"], r["best_fused_us"]) for r in layer_rows)
    print(f"per 1B decode step (16 layers): unfused {unfused:.0f} us, with the fused kernel "
          f"wherever it wins {fused:.0f} us")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps({"chain": chain, "shapes": rows}, indent=1))


if __name__ == "__main__":
    main()
