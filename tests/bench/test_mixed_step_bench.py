"""benchmarks/mixed_step_bench.py on CPU with a tiny dummy model (parallm's side)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import mixed_step_bench as bench  # noqa: E402


def test_rows_for_every_batch_and_arrival_length(tiny_model_dir, tmp_path, monkeypatch):
    config = tiny_model_dir("llama3") / "config.json"
    added: list[tuple[str, int, int]] = []
    real_add = bench.ParallmSteps.add

    def counting_add(self, request_id, prompt, max_tokens):
        added.append((request_id.split("-")[0], len(prompt), max_tokens))
        real_add(self, request_id, prompt, max_tokens)

    monkeypatch.setattr(bench.ParallmSteps, "add", counting_add)
    out = tmp_path / "mixed.json"
    code = bench.main(["--config", str(config), "--batch-sizes", "2,3", "--arrival-lens", "5,9",
                       "--context-len", "8", "--steps", "3", "--warmup-steps", "1",
                       "--profile-steps", "2", "--max-model-len", "256", "--out", str(out)])  # fmt: skip
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch_size"], r["arrival_len"]) for r in rows] == [(2, 5), (2, 9), (3, 5), (3, 9)]
    for r in rows:
        assert r["decode_ms"] > 0 and r["mixed_ms"] > 0
        assert r["launches_per_step"] >= 0 and r["device_ms_per_step"] >= 0
        assert isinstance(r["kernels"], dict) and isinstance(r["decode_kernels"], dict)
    # One arrival before every warm-up, timed and profiled mixed step; none for decode steps.
    arrivals = [a for a in added if a[0] == "arrival"]
    assert len(arrivals) == 2 * 2 * (1 + 3 + 2)  # the profiled decode steps add none
    assert {(n, t) for _, n, t in arrivals} == {(5, 1), (9, 1)}
    decoding = [a for a in added if a[0] == "decode"]
    assert len(decoding) == 2 + 3 and {n for _, n, _ in decoding} == {8}


def test_decoding_requests_must_outlast_the_steps():
    with pytest.raises(SystemExit, match="--max-model-len"):
        bench.parse_args(["--config", "c.json", "--steps", "2000"])


@pytest.mark.parametrize("flag", ["--steps", "--context-len", "--warmup-steps"])
def test_counts_must_be_positive(flag):
    with pytest.raises(SystemExit, match=flag):
        bench.parse_args(["--config", "c.json", flag, "0"])


def test_vllm_gets_parallms_limits_as_every_peer_run_gives_them():
    """The limits come from parallm's defaults through ``vllm_limits``, as ``--compare-vllm``
    and the serving peer read them; only the memory share is the bench's own flag."""
    from parallm.bench.vllm_peer import vllm_limits
    from parallm.config import EngineConfig, default_max_num_seqs, resolve_device

    limits = bench.parallm_limits(4096)
    cfg = EngineConfig()
    # max_num_seqs unset follows the device the engine would take (256 on CPU).
    seqs = default_max_num_seqs(resolve_device(cfg.device))
    assert limits["max_num_seqs"] == seqs and limits["block_size"] == cfg.block_size
    assert limits["enable_prefix_caching"] is cfg.enable_prefix_caching
    assert "gpu_memory_utilization" not in limits
    assert limits == {k: v for k, v in vllm_limits(cfg, 4096).items()
                      if k != "gpu_memory_utilization"}  # fmt: skip


def test_kernel_lines_put_the_mixed_steps_kernels_beside_the_decode_steps():
    row = {
        "kernels": {"_prefill_kernel": 1.5, "gemm": 2.0},
        "decode_kernels": {"gemm": 1.75, "_decode": 0.5},
    }
    lines = bench._kernel_lines(row)
    assert [line.split()[0] for line in lines] == ["_prefill_kernel", "gemm", "_decode"]
    assert lines[0].split()[-3:] == ["1.500", "decode", "0.000"]
    assert lines[2].split()[-4:] == ["mixed", "0.000", "decode", "0.500"]
    assert bench._kernel_lines({}) == []
