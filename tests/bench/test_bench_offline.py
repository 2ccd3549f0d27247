"""`parallm bench latency` and `bench throughput` on CPU with a tiny dummy model."""

from __future__ import annotations

import json
import re

import pytest

from parallm.cli import main


def test_latency_reports_every_batch_size(tiny_model_dir, tmp_path):
    config = tiny_model_dir("llama3") / "config.json"
    out = tmp_path / "latency.json"
    code = main(["bench", "latency", "--config", str(config), "--device", "cpu",
                 "--batch-sizes", "1,3", "--input-len", "8", "--output-len", "4", "--iters", "1",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    rows = result["results"]
    assert [r["batch_size"] for r in rows] == [1, 3]
    for r in rows:
        assert r["step_ms"] > 0 and r["tokens_per_s"] > 0 and r["bytes_per_step"] > 0
    assert result["weight_bytes"] > 0 and result["env"]["commit"]


def test_throughput_runs_the_standard_workload_shape(tiny_model_dir, tmp_path):
    config = tiny_model_dir("qwen3") / "config.json"
    out = tmp_path / "throughput.json"
    code = main(["bench", "throughput", "--config", str(config), "--device", "cpu",
                 "--num-requests", "6", "--min-len", "4", "--max-len", "12", "--out", str(out)])  # fmt: skip
    assert code == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["requests"] == 6
    assert 6 * 4 <= row["output_tokens"] <= 6 * 12
    assert row["output_tokens_per_s"] > 0 and row["total_tokens_per_s"] > row["output_tokens_per_s"]


def test_latency_table_units_and_no_roofline_on_cpu(tiny_model_dir, tmp_path, capsys):
    """GB/step is in GB; a CPU has no measured copy bandwidth, so no roofline columns."""
    config = tiny_model_dir("llama3") / "config.json"
    out = tmp_path / "latency.json"
    code = main(["bench", "latency", "--config", str(config), "--device", "cpu",
                 "--batch-size", "2", "--num-iters", "1", "--input-len", "8", "--output-len", "3",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "copy bandwidth (read+write): not measured on cpu" in printed
    assert "0 GB/s" not in printed
    lines = printed.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("batch"))
    columns = re.split(r"\s{2,}", lines[header].strip())
    assert columns == ["batch", "ms/token", "tok/s", "GB/step", "prefill ms"]
    cells = dict(zip(columns, re.split(r"\s{2,}", lines[header + 1].strip()), strict=True))
    (row,) = json.loads(out.read_text())["results"]
    assert row["batch_size"] == int(cells["batch"]) == 2
    assert float(cells["GB/step"]) == pytest.approx(row["bytes_per_step"] / 1e9, rel=1e-3)
    assert json.loads(out.read_text())["copy_bandwidth_gbps"] is None


def test_benchmarks_take_a_speculative_config(tiny_model_dir, tmp_path, capsys):
    """`--speculative-config` reaches the engine, and both benchmarks report the tokens a
    drafted sequence emitted per step (at least 1: its accepted drafts plus one)."""
    config = str(tiny_model_dir("llama3") / "config.json")
    spec = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}'
    common = ["--config", config, "--device", "cpu", "--speculative-config", spec]
    lat, thr = tmp_path / "latency.json", tmp_path / "throughput.json"
    assert main(["bench", "latency", *common, "--batch-sizes", "2", "--input-len", "16",
                 "--output-len", "24", "--iters", "1", "--out", str(lat)]) == 0  # fmt: skip
    assert main(["bench", "throughput", *common, "--num-requests", "4", "--min-len", "16",
                 "--max-len", "24", "--out", str(thr)]) == 0  # fmt: skip
    assert "tok/drafted step" in capsys.readouterr().out
    for path in (lat, thr):
        row = json.loads(path.read_text())["results"][0]
        assert row["tokens_per_drafted_step"] >= 1.0


def test_throughput_with_data_parallel_replicas_does_the_same_work(
    tiny_model_dir, tmp_path, capsys
):
    """`bench throughput -dp 2`: the same requests complete (the same tokens as one engine),
    spread over both replicas, and the summary names them; no replica is left running."""
    import multiprocessing

    config = tiny_model_dir("qwen3") / "config.json"
    common = ["bench", "throughput", "--config", str(config), "--device", "cpu",
              "--num-requests", "8", "--min-len", "4", "--max-len", "12"]  # fmt: skip
    one, two = tmp_path / "dp1.json", tmp_path / "dp2.json"
    assert main([*common, "--out", str(one)]) == 0
    assert main([*common, "--data-parallel-size", "2", "--out", str(two)]) == 0
    assert multiprocessing.active_children() == []
    (want,), result = json.loads(one.read_text())["results"], json.loads(two.read_text())
    (row,) = result["results"]
    assert row["requests"] == want["requests"] == 8
    assert row["output_tokens"] == want["output_tokens"]
    assert row["total_tokens_per_s"] > row["output_tokens_per_s"] > 0
    assert row["data_parallel_size"] == 2
    assert sum(row["requests_per_replica"]) == 8 and min(row["requests_per_replica"]) > 0
    assert row["peak_gpu_mem_gib"] is None  # the replicas' memory is not this process's
    assert re.match(r"data_parallel_size=2 \(replica 0: pid \d+ on .*; replica 1: pid \d+ ",
                    result["summary"])  # fmt: skip
    assert result["summary"] in capsys.readouterr().out
