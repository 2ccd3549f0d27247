"""`parallm bench latency` and `bench throughput` on CPU with a tiny dummy model."""

from __future__ import annotations

import json

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
