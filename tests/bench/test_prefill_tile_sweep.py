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


def _params(fn) -> dict:
    import inspect

    return inspect.signature(fn).parameters


def test_torch_varlen_arguments_follow_the_installed_signature():
    """The keyword arguments of torch's varlen attention are built from its signature, which
    differs between releases: causal by window or flag, paged by block table or not at all."""
    varlen = load_benchmark("torch_varlen")
    paged = {"block_table": "T", "seqused_k": "S"}

    def new(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
            enable_gqa=False, seqused_k=None, block_table=None):  # fmt: skip
        """2.13's form."""

    def flag(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, is_causal=False):
        """An older form."""

    def append(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
               k_cache=None, v_cache=None, page_table=None, seqused_k=None):  # fmt: skip
        """The FlashAttention 3 append form."""

    assert varlen.varlen_kwargs(_params(new), 0.1, gqa=True) == {
        "scale": 0.1, "window_size": (-1, 0), "enable_gqa": True,
    }  # fmt: skip
    assert varlen.varlen_kwargs(_params(new), 0.1, gqa=False, paged=paged) == {
        "scale": 0.1, "window_size": (-1, 0), **paged,
    }  # fmt: skip
    assert varlen.varlen_kwargs(_params(flag), 0.1, gqa=True) == {"scale": 0.1, "is_causal": True}
    with pytest.raises(NotImplementedError, match="no block_table, seqused_k$"):
        varlen.varlen_kwargs(_params(flag), 0.1, gqa=False, paged=paged)
    with pytest.raises(NotImplementedError, match="no block_table .*page_table"):
        varlen.varlen_kwargs(_params(append), 0.1, gqa=False, paged=paged)
    with pytest.raises(NotImplementedError, match="neither is_causal nor window_size"):
        varlen.varlen_kwargs(_params(lambda q, k, v, scale=None: None), 0.1, gqa=False)


def test_a_case_prints_the_varlen_forms_under_its_header(capsys):
    bench = load_benchmark("prefill_tile_sweep")
    tile = {"model": "m", "prompt_len": 8, "block_m": 64, "block_n": 32, "num_warps": 4,
            "num_stages": 2, "rel_err": 1e-3, "ms": 0.5, "package": True, "sdpa_ms": 0.4}  # fmt: skip
    forms = [
        {"model": "m", "prompt_len": 8, "variant": "torch varlen, contiguous", "rel_err": 2e-3,
         "ms": 0.3, "error": None},
        {"model": "m", "prompt_len": 8, "variant": "torch varlen, paged", "rel_err": None,
         "ms": None, "error": "varlen_attn has no block_table"},
    ]  # fmt: skip
    bench.print_case(forms + [tile])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "m prompt 8: SDPA 0.4000 ms; package 0.5000 ms"
    assert lines[1] == "  torch varlen, contiguous: 0.3000 ms  err 2.0e-03"
    assert lines[2] == "  torch varlen, paged: varlen_attn has no block_table"
    assert lines[3].endswith("<- package")
