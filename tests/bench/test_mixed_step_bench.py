"""benchmarks/mixed_step_bench.py on CPU with a tiny dummy model (parallm's side)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import mixed_step_bench as bench  # noqa: E402
from trace_files import write_trace  # noqa: E402


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


def test_contexts_from_a_trace_are_the_same_for_every_engine_and_capped(tmp_path):
    """Each batch's decoding prompts are consecutive trace requests part way through their
    outputs, capped at --context-len; the draw depends on the seed and batch alone, so parallm,
    vLLM and an older tree all decode the same contexts."""
    rows = [(30 * (i + 1), 20) for i in range(60)]
    argv = ["--config", "c.json", "--contexts-from", str(write_trace(tmp_path / "t.csv", rows)),
            "--context-len", "1000", "--batch-sizes", "8,16"]  # fmt: skip
    first, again = bench.parse_args(argv), bench.parse_args(argv)
    for batch in (8, 16):
        lens = bench.decode_contexts(first, batch)
        assert lens == bench.decode_contexts(again, batch) and len(lens) == batch
        assert max(lens) <= 1000 and len(set(lens)) > 1
        start = next(i for i, (p, _) in enumerate(rows) if p <= lens[0] <= p + 20)
        for i, n in enumerate(lens):
            assert min(1000, rows[start + i][0]) <= n <= rows[start + i][0] + 20
    other = bench.parse_args([*argv, "--seed", "1"])
    assert bench.decode_contexts(other, 16) != bench.decode_contexts(first, 16)
    assert bench.decode_contexts(bench.parse_args(["--config", "c.json"]), 3) == [128] * 3


def test_contexts_from_is_checked_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match="--contexts-from: no file"):
        bench.parse_args(["--config", "c.json", "--contexts-from", str(tmp_path / "none.csv")])
    short = write_trace(tmp_path / "t.csv", [(10, 1)] * 5)
    with pytest.raises(SystemExit, match="fewer than the largest batch"):
        bench.parse_args(["--config", "c.json", "--contexts-from", str(short)])


def test_a_run_decodes_the_drawn_contexts(tiny_model_dir, tmp_path, monkeypatch):
    config = tiny_model_dir("llama3") / "config.json"
    trace = write_trace(tmp_path / "t.csv", [(3 + i % 7, 4) for i in range(30)])
    added: list[int] = []
    real_add = bench.ParallmSteps.add

    def counting_add(self, request_id, prompt, max_tokens):
        if request_id.startswith("decode"):
            added.append(len(prompt))
        real_add(self, request_id, prompt, max_tokens)

    monkeypatch.setattr(bench.ParallmSteps, "add", counting_add)
    argv = ["--config", str(config), "--batch-sizes", "4", "--arrival-lens", "5",
            "--contexts-from", str(trace), "--context-len", "8", "--steps", "2",
            "--warmup-steps", "1", "--profile-steps", "0", "--max-model-len", "256",
            "--out", str(tmp_path / "m.json")]  # fmt: skip
    assert bench.main(argv) == 0
    assert added == bench.decode_contexts(bench.parse_args(argv), 4)
    row = json.loads((tmp_path / "m.json").read_text())["rows"][0]
    assert row["context_mean"] == sum(added) / 4 and row["context_max"] == max(added)
