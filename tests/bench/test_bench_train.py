"""``parallm bench train`` on CPU: a tiny Llama shape for 3 float32 steps, in one process
through the CLI and in two processes through torchrun, plus the config and baseline helpers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from parallm.bench.train import add_args, build_config, scaling_efficiency
from parallm.cli import main as cli_main
from parallm.train.config import TrainConfig
from parallm.train.telemetry import flops_per_token

REPO = Path(__file__).parents[2]
PEAK_FLOPS = 1e11  # explicit, since a CPU has no entry in the peak-FLOPs table

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}

# 3 timed float32 steps of 2 x 2 sequences of 32 tokens after one warm-up step.
BENCH_FLAGS = ["--seq-len", "32", "--micro-batch-size", "2", "--grad-accum", "2", "--steps", "3",
               "--warmup-steps", "1", "--dtype", "float32", "--device", "cpu",
               "--peak-flops", str(PEAK_FLOPS)]  # fmt: skip

POSITIVE_FIELDS = [
    "step_time_ms_mean", "step_time_ms_median", "tokens_per_s", "tokens_per_s_per_gpu",
    "flops_per_token", "flops_per_token_6n", "mfu", "achieved_tflops_per_gpu", "peak_memory_gib",
    "num_params", "loss_last",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bench-train") / "config.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


@pytest.fixture(scope="module")
def one_rank(tiny_config: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The payload of one single-process run through ``parallm bench train``."""
    out = tmp_path_factory.mktemp("bench-train-out") / "one.json"
    assert cli_main(["bench", "train", "--config", str(tiny_config), *BENCH_FLAGS,
                     "--out", str(out)]) == 0  # fmt: skip
    return json.loads(out.read_text())


def _args(config: Path, *flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_args(parser)
    return parser.parse_args(["--config", str(config), *flags])


def test_fields_present_and_positive(one_rank: dict[str, Any]) -> None:
    assert one_rank["benchmark"] == "train"
    (row,) = one_rank["results"]
    for key in POSITIVE_FIELDS:
        assert row[key] > 0, key
    assert len(row["step_times_ms"]) == 3 and all(t > 0 for t in row["step_times_ms"])
    assert (row["world_size"], row["tp"], row["dp"], row["grad_accum"]) == (1, 1, 1, 2)
    assert row["tokens_per_step"] == 2 * 2 * 32
    assert row["tokens_per_s"] == pytest.approx(row["tokens_per_s_per_gpu"])
    assert "scaling_efficiency" not in row  # no baseline given


def test_mfu_uses_the_trainers_flops_per_token(one_rank: dict[str, Any]) -> None:
    (row,) = one_rank["results"]
    shape = TrainConfig.from_dict(
        {"model": {k: TINY_CONFIG[k] for k in ("hidden_size", "intermediate_size",
                                               "num_hidden_layers", "num_attention_heads",
                                               "num_key_value_heads")},
         "data": {"vocab_size": 256, "seq_len": 32}}
    ).model_config()  # fmt: skip
    assert row["flops_per_token"] == flops_per_token(shape, 32)
    assert row["peak_flops_per_gpu"] == PEAK_FLOPS
    assert row["mfu"] == pytest.approx(row["tokens_per_s_per_gpu"] * row["flops_per_token"] / 1e11)
    # The step times and tokens/s describe the same timed window.
    step_s = row["step_time_ms_mean"] / 1e3
    assert row["tokens_per_s"] == pytest.approx(row["tokens_per_step"] / step_s)


def test_prints_a_table(tiny_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # One step, no --out and no --peak-flops: a CPU has no known peak, so MFU is left blank.
    flags = ["--seq-len", "16", "--micro-batch-size", "1", "--steps", "1", "--warmup-steps", "0",
             "--dtype", "float32", "--device", "cpu"]  # fmt: skip
    assert cli_main(["bench", "train", "--config", str(tiny_config), *flags]) == 0
    header, values = capsys.readouterr().out.splitlines()[:2]
    assert header.split() == ["GPUs", "TP", "mb", "accum", "batch", "step", "ms", "tok/s",
                              "tok/s/GPU", "TFLOP/s/GPU", "MFU", "%", "peak", "GiB",
                              "scaling", "%"]  # fmt: skip
    assert values.split()[-3:-1] == ["-", values.split()[-2]] and values.split()[-1] == "-"


def test_scaling_efficiency_against_a_baseline(one_rank: dict[str, Any], tmp_path: Path) -> None:
    (row,) = one_rank["results"]
    baseline = tmp_path / "baseline.json"
    halved = row | {"tokens_per_s_per_gpu": row["tokens_per_s_per_gpu"] * 2}
    baseline.write_text(json.dumps(one_rank | {"results": [halved]}))
    result = scaling_efficiency(row, baseline)
    assert result["scaling_efficiency"] == pytest.approx(0.5)
    assert result["baseline_mismatch"] == []
    other = row | {"seq_len": 64, "tokens_per_s_per_gpu": 1.0}
    baseline.write_text(json.dumps({"results": [other]}))
    assert scaling_efficiency(row, baseline)["baseline_mismatch"] == ["seq_len"]
    baseline.write_text(json.dumps({"results": [{"engine": "parallm"}]}))
    with pytest.raises(ValueError, match="--baseline-json"):
        scaling_efficiency(row, baseline)


def test_llama_1b_config(tmp_path: Path) -> None:
    """The benchmark's shape is the config file's; the global batch grows with data parallelism."""
    config = REPO / "benchmarks/configs/llama-3.2-1b.json"
    args = _args(config, "--micro-batch-size", "4", "--grad-accum", "2")
    cfg = build_config(args, world_size=2, work_dir=tmp_path)
    m = cfg.model
    assert (m.hidden_size, m.intermediate_size, m.num_hidden_layers) == (2048, 8192, 16)
    assert (m.num_attention_heads, m.num_key_value_heads, m.head_dim) == (32, 8, 64)
    assert m.tie_word_embeddings and m.rope_theta == 500000.0
    assert (cfg.data.corpus, cfg.data.vocab_size, cfg.data.seq_len) == ("synthetic", 128256, 2048)
    assert cfg.training.global_batch_size == 4 * 2 * 2
    assert cfg.parallel.mixed_precision == "bfloat16" and not cfg.checkpoint.resume
    # About 1.24B matmul parameters: 6N is ~7.4 GFLOP/token, attention ~0.8 at 2048 tokens.
    assert flops_per_token(cfg.model_config(), 2048) == pytest.approx(8.22e9, rel=0.01)
    tp2 = build_config(_args(config, "--tp", "2"), world_size=2, work_dir=tmp_path)
    assert (tp2.parallel.dp, tp2.training.global_batch_size) == (1, 4)


def test_bad_layout_is_an_error(tiny_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["bench", "train", "--config", str(tiny_config), "--tp", "2"]) == 2
    assert "--tp (2) must divide the world size (1)" in capsys.readouterr().err


@pytest.mark.slow
def test_two_ranks_under_torchrun(
    tiny_config: Path, one_rank: dict[str, Any], tmp_path: Path
) -> None:
    """Data parallel over 2 gloo ranks: one table and one JSON (rank 0), scaling vs 1 rank."""
    baseline = tmp_path / "one.json"
    baseline.write_text(json.dumps(one_rank))
    out = tmp_path / "two.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "parallm.bench.train", "--config", str(tiny_config), *BENCH_FLAGS,
           "--baseline-json", str(baseline), "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("tok/s/GPU") == 1  # only rank 0 reports
    (row,) = json.loads(out.read_text())["results"]
    assert (row["world_size"], row["dp"], row["global_batch_size"]) == (2, 2, 8)
    assert row["baseline_mismatch"] == []
    assert row["scaling_efficiency"] == pytest.approx(
        row["tokens_per_s_per_gpu"] / one_rank["results"][0]["tokens_per_s_per_gpu"]
    )
    assert row["mfu"] > 0
