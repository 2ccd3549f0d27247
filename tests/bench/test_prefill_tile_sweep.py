"""benchmarks/prefill_tile_sweep.py on CPU: the grid of tiles it sweeps (only tiles that fit the
shared memory as asked), its flags, and its refusals before any work (the timing needs CUDA)."""

from __future__ import annotations

import pytest
import torch
import triton_interpreter  # noqa: F401  before triton: the other modules' interpreter tests
from benchmark_module import load_benchmark

pytest.importorskip("triton")

HOPPER_SMEM = 227 * 1024


def test_the_grid_holds_the_packages_tile_and_only_tiles_that_fit():
    bench = load_benchmark("prefill_tile_sweep")
    from parallm.kernels.paged_kv import SMEM_RESERVE_BYTES, kv_tiles_bytes
    from parallm.kernels.paged_prefill import _prefill_config

    grid = bench.configs(128, 2, HOPPER_SMEM)
    assert _prefill_config(128, 3500, 2, 2, HOPPER_SMEM) in grid
    assert all(
        kv_tiles_bytes(c.block_m, c.block_n, c.num_stages, 128, 2)
        <= HOPPER_SMEM - SMEM_RESERVE_BYTES
        for c in grid
    )
    assert len(grid) < len(bench.configs(64, 2, HOPPER_SMEM))  # D = 128: fewer fit


def test_flags_and_refusals():
    bench = load_benchmark("prefill_tile_sweep")
    args = bench.build_parser().parse_args([])
    assert args.models == ["qwen3-0.6b", "llama-3.1-8b"] and args.prompt_lens == [2048, 3500]
    assert (
        not args.package_only and bench.build_parser().parse_args(["--package-only"]).package_only
    )
    with pytest.raises(SystemExit, match="--models: unknown"):
        bench.main(["--models", "gpt-9"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a GPU"):
            bench.main([])
