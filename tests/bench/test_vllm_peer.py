"""`parallm bench throughput|latency --compare-vllm` on CPU with a fake ``vllm``.

These check plumbing only: that vLLM would be given parallm's exact token ids, sampling
parameters and LLM keyword arguments, that its answers land in the same table, JSON and plot,
and that a missing vLLM is reported before any engine starts. The fake ``vllm`` records what
it is asked and answers outputs of the right shape; no figure here says anything about speed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from parallm.bench import latency, throughput, vllm_peer
from parallm.cli import main

# A stand-in for vllm: records each call as a JSON line in $FAKE_VLLM_LOG; outputs carry
# max_tokens token ids, and (with stats on) timestamps making every decode step STEP_S long.
FAKE_VLLM = """
import json, os

__version__ = "0.0-fake"
STEP_S = 0.002


def _record(entry):
    with open(os.environ["FAKE_VLLM_LOG"], "a") as f:
        f.write(json.dumps(entry) + "\\n")


class SamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class _Stats:
    def __init__(self, queued, first, last):
        self.queued_ts, self.first_token_ts, self.last_token_ts = queued, first, last


class _Completion:
    def __init__(self, token_ids):
        self.token_ids = token_ids


class _Output:
    def __init__(self, token_ids, metrics):
        self.outputs, self.metrics = [_Completion(token_ids)], metrics


class LLM:
    def __init__(self, **kwargs):
        with open(os.path.join(kwargs["model"], "config.json")) as f:
            config = json.load(f)
        self.log_stats = not kwargs.get("disable_log_stats", True)
        self.clock = 100.0
        _record({"call": "LLM", "kwargs": kwargs, "config": config})

    def generate(self, prompts, params, use_tqdm=True):
        params = params if isinstance(params, list) else [params] * len(prompts)
        _record({"call": "generate", "prompts": [p["prompt_token_ids"] for p in prompts],
                 "params": [p.kwargs for p in params]})
        first = self.clock + 0.05
        outs = []
        for p in params:
            n = p.kwargs["max_tokens"]
            stats = _Stats(self.clock, first, first + (n - 1) * STEP_S) if self.log_stats else None
            outs.append(_Output([7] * n, stats))
        self.clock += 10.0
        return outs

    def reset_prefix_cache(self):
        _record({"call": "reset_prefix_cache"})
        return True
"""
STEP_S = 0.002


@pytest.fixture
def fake_vllm(monkeypatch, tmp_path):
    """The fake imported in this process (so the bench runs it in-process); its call log."""
    log = tmp_path / "vllm_calls.jsonl"
    monkeypatch.setenv("FAKE_VLLM_LOG", str(log))
    module = types.ModuleType("vllm")
    exec(FAKE_VLLM, module.__dict__)
    monkeypatch.setitem(sys.modules, "vllm", module)
    return log


def calls(log: Path, kind: str | None = None) -> list[dict]:
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    return [e for e in entries if kind is None or e["call"] == kind]


def _throughput_args(config: Path, out: Path, *extra: str) -> list[str]:
    return ["bench", "throughput", "--config", str(config), "--device", "cpu",
            "--num-requests", "6", "--min-len", "4", "--max-len", "12", "--out", str(out),
            *extra]  # fmt: skip


# ---- flags ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bench, default", [("throughput", "stock,parallm-limits"),
                                            ("latency", "stock")])  # fmt: skip
def test_help_names_the_vllm_flags_and_defaults(bench, default, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", bench, "--help"])
    assert exit_info.value.code == 0
    text = re.sub(r"-\s+", "-", " ".join(capsys.readouterr().out.split()))  # undo wrapping
    for flag in ("--compare-vllm", "--vllm-configs", "--plot"):
        assert flag in text
    assert f"(default: {default})" in text


def test_vllm_configs_parse_and_refuse_unknown_names(capsys):
    assert vllm_peer.vllm_configs("parallm-limits, stock") == ("parallm-limits", "stock")
    assert vllm_peer.vllm_configs("stock,stock") == ("stock",)
    for bad in ("", "fast", "stock,tuned"):
        with pytest.raises(argparse.ArgumentTypeError, match="stock, parallm-limits"):
            vllm_peer.vllm_configs(bad)
    with pytest.raises(SystemExit):
        main(["bench", "latency", "--vllm-configs", "tuned"])
    assert "--vllm-configs: expected configurations" in capsys.readouterr().err


# ---- a missing vLLM ---------------------------------------------------------------------------


def test_missing_vllm_fails_before_the_engine_starts(monkeypatch, tmp_path, capsys):
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    real_find_spec = vllm_peer.importlib.util.find_spec
    monkeypatch.setattr(vllm_peer.importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))  # fmt: skip

    def no_engine(**kwargs):
        raise AssertionError("the engine started before the vLLM check")

    monkeypatch.setattr("parallm.LLM", no_engine)
    code = main(["bench", "throughput", "--config", "unused.json", "--compare-vllm"])
    assert code == 2
    err = capsys.readouterr().err
    assert "parallm bench throughput: error: --compare-vllm: no module named 'vllm'" in err
    assert f"pip install vllm=={vllm_peer.VLLM_VERSION}" in err
    assert "benchmarks/peers/README.md" in err


@pytest.mark.parametrize("flags, named", [
    (["--quantization", "int8"], "--quantization int8"),
    (["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}'], "--speculative-config"),
    (["--tensor-parallel-size", "2"], "--tensor-parallel-size 2"),
    (["--data-parallel-size", "2"], "--data-parallel-size 2"),
])  # fmt: skip
def test_flags_vllm_would_not_mirror_are_refused_first(
    flags, named, fake_vllm, monkeypatch, capsys
):
    def no_engine(**kwargs):
        raise AssertionError("the engine started before the check")

    monkeypatch.setattr("parallm.LLM", no_engine)
    code = main(["bench", "latency", "--config", "unused.json", "--compare-vllm", *flags])
    assert code == 2
    err = capsys.readouterr().err
    assert "--compare-vllm compares plain runs" in err and named in err
    assert not fake_vllm.exists()  # vLLM was never asked anything


def test_half_installed_vllm_names_its_missing_module(monkeypatch, tmp_path):
    """A vllm that is found but does not import (a wheel left out) is reported with the import
    error, before anything runs."""
    package = tmp_path / "site" / "vllm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("import llguidance_missing_for_this_test\n")
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "site"), *sys.path]))
    with pytest.raises(vllm_peer.VllmUnavailable, match="llguidance_missing_for_this_test"):
        vllm_peer.require_vllm()


# ---- the plumbing -----------------------------------------------------------------------------


def test_throughput_gives_vllm_the_same_requests_and_both_configs(tiny_model_dir, tmp_path,
                                                                    fake_vllm, capsys):  # fmt: skip
    config = tiny_model_dir("qwen3") / "config.json"
    out = tmp_path / "throughput.json"
    assert main(_throughput_args(config, out, "--compare-vllm")) == 0

    result = json.loads(out.read_text())
    args = argparse.Namespace(num_requests=6, min_len=4, max_len=12, workload_seed=0)
    prompts, out_lens = throughput.workload(args, json.loads(config.read_text())["vocab_size"])

    constructed = calls(fake_vllm, "LLM")
    assert len(constructed) == 2
    limit = json.loads(config.read_text())["max_position_embeddings"]
    base = {"load_format": "dummy", "dtype": "float32", "max_model_len": limit, "seed": 0,
            "skip_tokenizer_init": True}  # fmt: skip
    defaults, limited = (c["kwargs"] for c in constructed)
    assert {k: v for k, v in defaults.items() if k != "model"} == base
    assert {k: v for k, v in limited.items() if k != "model"} == base | {
        "max_num_seqs": 256, "max_num_batched_tokens": 8192, "block_size": 16,
        "gpu_memory_utilization": 0.9, "enable_prefix_caching": True,
        "enable_chunked_prefill": True, "enforce_eager": False,
    }  # fmt: skip
    assert all(c["config"] == json.loads(config.read_text()) for c in constructed)

    generates = calls(fake_vllm, "generate")
    assert len(generates) == 4  # per configuration: the warm-up, then the timed run
    for warm, timed in (generates[0:2], generates[2:4]):
        assert warm["prompts"] == prompts[:8] and timed["prompts"] == prompts
        assert [p["max_tokens"] for p in timed["params"]] == out_lens
        assert all(p == {"temperature": 0.0, "max_tokens": p["max_tokens"], "ignore_eos": True,
                         "detokenize": False} for p in timed["params"])  # fmt: skip
    assert len(calls(fake_vllm, "reset_prefix_cache")) == 2

    ours, *peers = result["results"]
    assert ours["engine"] == "parallm"
    assert [r["engine"] for r in peers] == ["vllm 0.0-fake (stock)",
                                            "vllm 0.0-fake (parallm-limits)"]  # fmt: skip
    for row in peers:
        assert row["output_tokens"] == sum(out_lens) and row["requests"] == 6
        assert row["parallm_speedup"] == pytest.approx(
            ours["output_tokens_per_s"] / row["output_tokens_per_s"]
        )
        assert row["vllm_kwargs"]["model"] == str(config)
    assert result["vllm"]["model"]["limits"]["max_num_seqs"] == 256
    table = capsys.readouterr().out
    assert "parallm x" in table and "vllm 0.0-fake (parallm-limits)" in table


def test_latency_gives_vllm_the_same_prompts_and_times_its_steps(tiny_model_dir, tmp_path,
                                                                 fake_vllm):  # fmt: skip
    config = tiny_model_dir("llama3") / "config.json"
    out = tmp_path / "latency.json"
    code = main(["bench", "latency", "--config", str(config), "--device", "cpu",
                 "--batch-sizes", "1,3", "--input-len", "8", "--output-len", "5", "--iters", "2",
                 "--compare-vllm", "--out", str(out)])  # fmt: skip
    assert code == 0

    (constructed,) = calls(fake_vllm, "LLM")
    assert constructed["kwargs"]["disable_log_stats"] is False  # the step times need its stats
    vocab = json.loads(config.read_text())["vocab_size"]
    expected = [latency.run_prompts(b, 8, vocab, i) for b in (1, 3) for i in range(3)]
    generates = calls(fake_vllm, "generate")
    assert [g["prompts"] for g in generates] == expected
    assert all(p["max_tokens"] == 5 and p["ignore_eos"] and p["temperature"] == 0.0
               for g in generates for p in g["params"])  # fmt: skip

    rows = json.loads(out.read_text())["results"]
    ours = {r["batch_size"]: r for r in rows if r["engine"] == "parallm"}
    peers = [r for r in rows if r["engine"] != "parallm"]
    assert sorted(ours) == [1, 3] and [r["batch_size"] for r in peers] == [1, 3]
    for row in peers:
        assert row["ms_per_token"] == pytest.approx(STEP_S * 1e3)
        assert row["tokens_per_s"] == pytest.approx(row["batch_size"] / STEP_S)
        assert row["bytes_per_step"] == ours[row["batch_size"]]["bytes_per_step"]
        assert row["parallm_speedup"] == pytest.approx(
            row["ms_per_token"] / ours[row["batch_size"]]["ms_per_token"]
        )


def test_vllm_runs_in_a_child_process_when_not_imported(monkeypatch, tmp_path):
    """Without vllm imported here, the job goes to `python -m parallm.bench.vllm_peer` and
    its result comes back through a file."""
    package = tmp_path / "site" / "vllm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_VLLM)
    log = tmp_path / "calls.jsonl"
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    monkeypatch.setenv("FAKE_VLLM_LOG", str(log))
    repo = Path(__file__).resolve().parents[2]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "site"), str(repo)]))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"vocab_size": 50}))
    model = vllm_peer.PeerModel(str(config), "dummy", "bfloat16", 64, 0, {"max_num_seqs": 4})
    prompts = [[11, 12, 13], [14, 15]]
    rows = vllm_peer.throughput_rows(model, ("parallm-limits",), prompts, [3, 2])
    (row,) = rows
    assert row["engine"] == "vllm 0.0-fake (parallm-limits)" and row["output_tokens"] == 5
    assert calls(log, "generate")[-1]["prompts"] == prompts
    assert calls(log, "LLM")[0]["kwargs"]["max_num_seqs"] == 4


def test_a_failing_vllm_child_is_an_error(monkeypatch, tmp_path):
    package = tmp_path / "site" / "vllm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise SystemExit(3)\n")
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    repo = Path(__file__).resolve().parents[2]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "site"), str(repo)]))
    model = vllm_peer.PeerModel("some/hub-id", "auto", "bfloat16", 64, 0)
    with pytest.raises(RuntimeError, match="vLLM run failed \\(exit status 3\\)"):
        vllm_peer.throughput_rows(model, ("stock",), [[1]], [1])


# ---- merging and plots ------------------------------------------------------------------------


def test_speedups_match_rows_by_batch_and_skip_rows_without_a_partner():
    rows = [
        {"engine": "parallm", "batch_size": 1, "ms_per_token": 2.0},
        {"engine": "parallm", "batch_size": 8, "ms_per_token": 4.0},
        {"engine": "vllm", "vllm_config": "stock", "batch_size": 1, "ms_per_token": 3.0},
        {"engine": "vllm", "vllm_config": "stock", "batch_size": 8, "ms_per_token": 2.0},
        {"engine": "vllm", "vllm_config": "stock", "batch_size": 32, "ms_per_token": 5.0},
    ]
    vllm_peer.add_speedups(rows, "ms_per_token", higher_is_better=False, match="batch_size")
    assert [r.get("parallm_speedup") for r in rows] == [None, None, 1.5, 0.5, None]
    rates = [{"engine": "parallm", "tok": 300.0}, {"engine": "hf", "tok": 10.0},
             {"engine": "v", "vllm_config": "stock", "tok": 200.0}]  # fmt: skip
    vllm_peer.add_speedups(rates, "tok", higher_is_better=True)
    assert [r.get("parallm_speedup") for r in rates] == [None, None, 1.5]


def test_plot_is_written(tiny_model_dir, tmp_path, fake_vllm):
    config = tiny_model_dir("qwen3") / "config.json"
    chart = tmp_path / "charts" / "throughput.png"
    args = _throughput_args(config, tmp_path / "t.json", "--compare-vllm",
                            "--vllm-configs", "stock", "--plot", str(chart))  # fmt: skip
    assert main(args) == 0
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = tmp_path / "latency.png"
    rows = [{"engine": e, "batch_size": b, "ms_per_token": m, **c}
            for e, c, m in (("parallm", {}, 1.0), ("vllm x (stock)", {"vllm_config": "stock"}, 1.2))
            for b in (1, 8)]  # fmt: skip
    vllm_peer.plot_latency(rows, lines, "decode")
    assert lines.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_folder_for_a_config_file_holds_only_it(tmp_path):
    config = tmp_path / "shape.json"
    config.write_text('{"vocab_size": 8}')
    model = vllm_peer.PeerModel(str(config), "dummy", "bfloat16", 64, 0)
    folder = Path(vllm_peer.model_dir(model, tmp_path / "scratch"))
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
    assert (folder / "config.json").read_text() == config.read_text()
    hub = vllm_peer.PeerModel("Qwen/Qwen3-0.6B", "auto", "bfloat16", 64, 0)
    assert vllm_peer.model_dir(hub, tmp_path / "scratch") == "Qwen/Qwen3-0.6B"
    with pytest.raises(ValueError, match="unknown vLLM configuration"):
        vllm_peer.llm_kwargs(model, str(folder), "tuned")


def test_child_entry_point_runs_a_job_file(tmp_path):
    """`python -m parallm.bench.vllm_peer JOB RESULT` refuses an unknown job kind loudly."""
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"kind": "nonsense", "llm_kwargs": {}}))
    site = tmp_path / "site" / "vllm"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("__version__ = 'x'\n")
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), str(repo)]))
    done = subprocess.run([sys.executable, "-m", "parallm.bench.vllm_peer", str(job),
                           str(tmp_path / "r.json")], capture_output=True, text=True, env=env)  # fmt: skip
    assert done.returncode != 0 and "unknown job kind 'nonsense'" in done.stderr


@pytest.mark.gpu
def test_real_vllm_generates_the_workload_it_is_given(tmp_path):
    """With vLLM installed (benchmarks/peers on the GPU machine): a small --compare-vllm run
    where vLLM's row produces exactly the workload's output tokens."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed (benchmarks/peers/README.md installs it)")
    config = Path(__file__).resolve().parents[2] / "benchmarks/configs/qwen3-0.6b.json"
    out = tmp_path / "throughput.json"
    code = main(["bench", "throughput", "--config", str(config), "--max-model-len", "1024",
                 "--num-requests", "16", "--min-len", "16", "--max-len", "64", "--compare-vllm",
                 "--vllm-configs", "stock", "--out", str(out)])  # fmt: skip
    assert code == 0
    ours, peer = json.loads(out.read_text())["results"]
    assert peer["vllm_config"] == "stock" and peer["engine"].startswith("vllm 0.26")
    assert peer["output_tokens"] == ours["output_tokens"] and peer["output_tokens_per_s"] > 0
