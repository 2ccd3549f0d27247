"""benchmarks/decode_order_bench.py: the contexts it draws from a trace, its refusals before
any work, and (GPU) a whole small run, whose ordered outputs must equal the unordered ones."""

from __future__ import annotations

import json

import numpy as np
import pytest
import triton_interpreter  # noqa: F401  before triton: the other modules' interpreter tests
from benchmark_module import load_benchmark
from trace_files import write_trace

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("decode_order_bench")


def test_bad_flags_are_refused_before_any_work(bench, tmp_path, capsys):
    trace = write_trace(tmp_path / "t.csv", [(10, 1)] * 4)
    with pytest.raises(SystemExit, match="none.csv: no such file"):
        bench.main(["--trace", str(tmp_path / "none.csv")])
    for argv, message in (
        (["--trace", str(trace), "--batches", "32,x"], "--batches: expected positive integers"),
        (["--trace", str(trace), "--batches", "0"], "--batches: expected positive integers"),
        (["--trace", str(trace), "--draws", "0"], "--draws: expected at least 1"),
    ):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        assert message in capsys.readouterr().err
    assert bench.parse_args(["--trace", str(trace), "--batches", "8,97"]).batches == [8, 97]


@pytest.mark.gpu
def test_a_small_run_times_every_order_on_the_same_rows(bench, tmp_path):
    rng = np.random.default_rng(1)
    rows = [(int(p), int(o)) for p, o in zip(rng.integers(20, 3000, 200),
                                             rng.integers(1, 400, 200), strict=True)]  # fmt: skip
    out = tmp_path / "order.json"
    argv = ["--trace", str(write_trace(tmp_path / "t.csv", rows)), "--batches", "8,97",
            "--draws", "2", "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0  # time_orders checks each order's output bit for bit
    report = json.loads(out.read_text())
    assert [r["batch"] for r in report["rows"]] == [8, 97]
    for row in report["rows"]:
        assert set(row["us"]) == {"batch", "longest first", "shortest first"}
        assert all(us > 0 for us in [*row["us"].values(), *row["control_us"].values()])


def test_the_wave_model_schedules_in_order_and_longest_first_ends_no_later():
    sim = load_benchmark("decode_wave_sim")
    # Two slots: batch order runs the long program last, alone; longest first overlaps it.
    assert sim.makespan([1.0, 1.0, 4.0], slots=2) == 5.0
    assert sim.makespan([4.0, 1.0, 1.0], slots=2) == 4.0
    assert sim.programs([256, 0], kv_heads=2) == [3.0, 3.0, 1.0, 1.0]  # KV heads fastest
    rng = np.random.default_rng(0)
    for _ in range(50):
        work = list(rng.integers(1, 30, size=40).astype(float))
        assert sim.makespan(sorted(work, reverse=True), 8) <= sim.makespan(work, 8) * 4 / 3
