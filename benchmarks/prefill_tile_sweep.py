"""The paged prefill kernel's tiles for long prompts, swept: which (block_m, block_n, warps,
stages) runs a 2,048- or 3,500-token prompt fastest, against the package's choice
(``paged_prefill._prefill_config``), torch's ``scaled_dot_product_attention`` on the same
data made contiguous, and torch's FlashAttention varlen on it contiguous and paged where the
installed torch has that form (benchmarks/torch_varlen.py) (needs CUDA).

Why: a Qwen3-0.6B step of 3,500 prompt tokens beside 128 decodes spent 10.48 ms in the prefill
kernel where vLLM's FA3 took 7.99 for the prompt and the decode rows together (RESULTS,
eighteenth session), and at D = 128 the kernel ran 1.5x SDPA's time when last measured (first
session, untuned tiles). Every configuration is checked against the float64 twin first (a
relative error above ``--max-rel-err`` drops it) and timed by a CUDA graph's replay.

    python benchmarks/prefill_tile_sweep.py [--models qwen3-0.6b,llama-3.1-8b]
        [--prompt-lens 2048,3500] [--out sweep.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention_bench import (  # noqa: E402
    ROW_MODELS,
    bench,
    gather_context,
    make_cache,
    reference,
    rel_err,
    sdpa_inputs,
    time_sdpa,
)
from torch_varlen import varlen_runs  # noqa: E402

from parallm.kernels import paged_prefill  # noqa: E402
from parallm.kernels.paged_kv import fit_kv_tiles, shared_memory_bytes  # noqa: E402

BLOCK_M = (64, 128)
BLOCK_N = (32, 64, 128)
WARPS = (4, 8)
STAGES = (2, 3, 4)


def configs(head_dim: int, elem_bytes: int, smem: int) -> list[paged_prefill._PrefillConfig]:
    """Every tile in the grid whose K/V stages fit ``smem`` bytes as asked (``fit_kv_tiles``
    would shrink it: that one is in the grid already)."""
    block_d = 1 << (head_dim - 1).bit_length()
    out = []
    for m, n, w, s in itertools.product(BLOCK_M, BLOCK_N, WARPS, STAGES):
        if fit_kv_tiles(m, n, s, block_d, elem_bytes, smem) == (n, s):
            out.append(paged_prefill._PrefillConfig(m, n, w, s))
    return out


def sweep_case(model: str, prompt_len: int, dtype: torch.dtype, max_rel_err: float,
               package_only: bool = False) -> list[dict]:  # fmt: skip
    heads = ROW_MODELS[model]
    q, k_cache, v_cache, tables, qsl, seq_lens = make_cache([(prompt_len, prompt_len)], heads,
                                                            dtype)  # fmt: skip
    scale = heads[2] ** -0.5
    ref = reference(q, k_cache, v_cache, tables, qsl, seq_lens, scale, 1)
    chosen = paged_prefill._prefill_config(heads[2], prompt_len, heads[0] // heads[1],
                                           q.element_size(), shared_memory_bytes(q.device))  # fmt: skip

    def run() -> torch.Tensor:
        return paged_prefill.paged_prefill_attention(q, k_cache, v_cache, tables, qsl, seq_lens,
                                                     prompt_len, scale)  # fmt: skip

    sdpa = time_sdpa(*sdpa_inputs(q, k_cache, v_cache, tables, seq_lens, prompt_len), causal=True)
    rows = _varlen_rows(model, prompt_len, (q, k_cache, v_cache, tables, seq_lens), scale, ref,
                        max_rel_err)  # fmt: skip
    grid = [chosen] if package_only else configs(heads[2], q.element_size(),
                                                 shared_memory_bytes(q.device))  # fmt: skip
    for cfg in grid:
        with mock.patch.object(paged_prefill, "_prefill_config", lambda *a, cfg=cfg: cfg):
            try:
                err = rel_err(run(), ref)
            except Exception as exc:  # noqa: BLE001 - a tile Triton cannot build is skipped
                print(f"  {cfg}: {type(exc).__name__}", file=sys.stderr)
                continue
            ms = bench(run) if err <= max_rel_err else None
        rows.append({"model": model, "prompt_len": prompt_len, "block_m": cfg.block_m,
                     "block_n": cfg.block_n, "num_warps": cfg.num_warps,
                     "num_stages": cfg.num_stages, "rel_err": err, "ms": ms,
                     "package": cfg == chosen, "sdpa_ms": sdpa})  # fmt: skip
    return rows


def _varlen_rows(model: str, prompt_len: int, case: tuple, scale: float, ref: torch.Tensor,
                 max_rel_err: float) -> list[dict]:  # fmt: skip
    """torch's FlashAttention varlen on the same prompt, its context contiguous and paged
    (benchmarks/torch_varlen.py): a row per form, with its time or why it did not run."""
    q, k_cache, v_cache, tables, seq_lens = case
    keys, values = (gather_context(c, tables, 0, prompt_len) for c in (k_cache, v_cache))
    rows = []
    for form, run in varlen_runs(q, k_cache, v_cache, tables, seq_lens, keys, values,
                                 scale).items():  # fmt: skip
        row = {"model": model, "prompt_len": prompt_len, "variant": f"torch varlen, {form}",
               "rel_err": None, "ms": None, "error": None}  # fmt: skip
        if isinstance(run, str):
            row["error"] = run
        else:
            try:
                row["rel_err"] = rel_err(run(), ref)
                if row["rel_err"] <= max_rel_err:
                    row["ms"] = bench(run)
            except Exception as exc:  # noqa: BLE001 - a form this build cannot run is reported
                row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
        rows.append(row)
    return rows


def print_case(rows: list[dict]) -> None:
    tiles = [r for r in rows if "variant" not in r]
    timed = sorted((r for r in tiles if r["ms"] is not None), key=lambda r: r["ms"])
    if not timed:
        print("  no configuration passed the check")
        return
    head = timed[0]
    package = next((r for r in tiles if r["package"]), None)
    print(f"{head['model']} prompt {head['prompt_len']}: SDPA {head['sdpa_ms'] or float('nan'):.4f} ms; "
          f"package {package['ms'] if package else float('nan'):.4f} ms")  # fmt: skip
    for r in (r for r in rows if "variant" in r):
        what = (f"{r['ms']:.4f} ms  err {r['rel_err']:.1e}" if r["ms"] is not None
                else r["error"] or f"err {r['rel_err']:.1e}, not timed")  # fmt: skip
        print(f"  {r['variant']}: {what}")
    for r in timed[:8]:
        mark = "  <- package" if r["package"] else ""
        print(f"  m={r['block_m']:>3} n={r['block_n']:>3} warps={r['num_warps']} "
              f"stages={r['num_stages']}  {r['ms']:.4f} ms  err {r['rel_err']:.1e}{mark}")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    words = lambda s: s.split(",")  # noqa: E731
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    ap.add_argument("--models", type=words, default=["qwen3-0.6b", "llama-3.1-8b"],
                    help=f"head shapes: {', '.join(ROW_MODELS)}")  # fmt: skip
    ap.add_argument("--prompt-lens", type=ints, default=[2048, 3500],
                    help="one prompt of this many tokens a case")  # fmt: skip
    ap.add_argument("--max-rel-err", type=float, default=2e-2,
                    help="a configuration further from the float64 twin is not timed")  # fmt: skip
    ap.add_argument("--package-only", action="store_true",
                    help="time the package's tile alone (two trees' kernels side by side)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=None, help="every row as JSON")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    unknown = sorted(set(args.models) - set(ROW_MODELS))
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; known: {sorted(ROW_MODELS)}")
    if not torch.cuda.is_available():
        raise SystemExit("prefill_tile_sweep times CUDA graphs: it needs a GPU")
    rows = []
    for model, prompt_len in itertools.product(args.models, args.prompt_lens):
        case = sweep_case(model, prompt_len, torch.bfloat16, args.max_rel_err, args.package_only)
        print_case(case)
        rows += case
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
