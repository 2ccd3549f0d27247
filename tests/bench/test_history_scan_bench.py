"""benchmarks/history_scan_bench.py's inputs: a ring that wrapped after its datastore base, and
rows of which the asked share have drafts of their own (on CPU; the timing needs CUDA)."""

from __future__ import annotations

import torch
from benchmark_module import load_benchmark


def test_the_ring_wraps_after_its_base_and_rows_end_in_ring_slices():
    bench = load_benchmark("history_scan_bench")
    history = bench.make_ring(5000, 1000, 50, seed=0)
    assert history.wrapped and history.start == 5001  # the base, then a separator
    ring = history.ring[: history.used]
    tokens, lengths, drafts, counts = bench.make_rows(history, 4, 16, 0.0, seed=1)
    assert lengths.tolist() == [16] * 4 and drafts.shape == (4, 8)
    assert counts.tolist() == [0] * 4  # every row scans
    for row in tokens.tolist():  # a slice of the ring, separators as 0
        windows = ring.unfold(0, 16, 1).clamp(min=0)
        assert (windows == torch.tensor(row, dtype=ring.dtype)).all(dim=1).any()
    assert bench.make_rows(history, 4, 16, 1.0, seed=1)[3].tolist() == [2] * 4  # none scans


def test_the_defaults_time_three_datastore_sizes_at_batch_1_and_8():
    args = load_benchmark("history_scan_bench").build_parser().parse_args([])
    assert args.base_tokens == [1 << 20, 1 << 24, 103_000_000] and args.batch_sizes == [1, 8]
