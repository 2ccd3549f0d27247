"""Profiles on demand (vLLM's profiler_config): the config's checks, and LLM.start_profile /
stop_profile writing a trace and its table that hold the steps run between them."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from server_support import tiny_model_path

from parallm.config import EngineConfig
from parallm.engine.core.loop import EngineCoreLoop
from parallm.engine.core.messages import StartProfile, StopProfile
from parallm.engine.profiler import ProfilerConfig, ProfilerMisuse, ProfilerOff, table_path
from parallm.llm import LLM
from parallm.sampling_params import SamplingParams


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"profiler": "nsys", "torch_profiler_dir": "d"}, "profiler must be one of ['torch']"),
        ({"profiler": "torch"}, "torch_profiler_dir is required"),
        ({"profiler": "torch", "dir": "d"}, "unknown key(s) ['dir']"),
        ({"profiler": "torch", "torch_profiler_dir": "d", "torch_profiler_with_stack": "yes"},
         "torch_profiler_with_stack must be true or false"),
        ("{not json", "profiler_config must be a JSON object such as"),
        (["torch"], "must be a dict, a JSON object string or a ProfilerConfig"),
    ],
)  # fmt: skip
def test_bad_profiler_configs_name_the_field(value: object, message: str) -> None:
    with pytest.raises(ValueError) as err:
        EngineConfig(profiler_config=value)
    assert message in str(err.value)


def test_a_json_profiler_config_as_the_cli_passes_it() -> None:
    cfg = EngineConfig(profiler_config='{"profiler": "torch", "torch_profiler_dir": "/p"}')
    assert cfg.profiler_config == ProfilerConfig("torch", "/p")
    assert cfg.profiler_config.enabled
    assert EngineConfig().profiler_config is None
    assert EngineConfig(profiler_config="null").profiler_config is None  # as speculative_config


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("profiles")


@pytest.fixture(scope="module")
def llm(traces: Path) -> Iterator[LLM]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    config = {"profiler": "torch", "torch_profiler_dir": str(traces / "nested")}
    llm = LLM(str(tiny_model_path()), device="cpu", kv_cache_memory=4 << 20,
              max_model_len=256, profiler_config=config)  # fmt: skip
    try:
        yield llm
    finally:
        llm.close()
        torch.set_num_threads(threads)


def _events(trace: str) -> list[dict]:
    with gzip.open(trace, "rt") as f:
        return json.load(f)["traceEvents"]


def test_a_profile_holds_the_steps_between_start_and_stop(llm: LLM) -> None:
    params = SamplingParams(max_tokens=4, ignore_eos=True, temperature=0)
    llm.generate([list(range(10, 40))], params, use_tqdm=False)  # before: not recorded
    llm.start_profile()
    llm.generate([list(range(10, 40)), list(range(50, 60))], params, use_tqdm=False)
    trace = llm.stop_profile()
    assert trace.endswith(".pt.trace.json.gz") and Path(trace).parent.name == "nested"
    names = [e.get("name", "") for e in _events(trace)]
    # Each generate call steps the engine; the model's matmuls ran inside the profile.
    assert any("aten::mm" in n or "aten::addmm" in n or "aten::linear" in n for n in names)
    # Each step is a range named by its shape, as vLLM names its steps: the two prompts in one
    # step (the first's 16-token block cached by the call before: 14 + 10 tokens computed),
    # then three steps decoding both. None from before the start.
    steps = [n for n in names if n.startswith("execute_context_")]
    assert steps == ["execute_context_2(24)_generation_0(0)"] + [
        "execute_context_0(0)_generation_2(2)"] * 3  # fmt: skip
    table = table_path(trace).read_text()
    assert "Self CPU" in table and "aten::" in table
    assert not llm.engine.runner.annotate_steps  # none once the profile stopped
    # A second profile is a new pair of files; the first stays.
    llm.start_profile()
    second = llm.stop_profile()
    assert second != trace and Path(trace).exists() and Path(second).exists()


def test_profiler_misuse_is_a_clear_error(llm: LLM, traces: Path) -> None:
    with pytest.raises(ProfilerMisuse, match="no profile is running"):
        llm.stop_profile()
    llm.start_profile()
    with pytest.raises(ProfilerMisuse, match="already running"):
        llm.start_profile()
    llm.stop_profile()


def test_an_engine_without_profiler_config_says_how_to_turn_it_on() -> None:
    llm = LLM(str(tiny_model_path()), device="cpu", kv_cache_memory=1 << 20, max_model_len=64)
    try:
        with pytest.raises(ProfilerOff, match="--profiler-config"):
            llm.start_profile()
    finally:
        llm.close()


def test_the_core_answers_every_profiler_command_with_whose_fault_a_failure_is(
    tmp_path: Path,
) -> None:
    """Misuse is the caller's (400); a trace that cannot be written is the server's (500),
    and the core goes on."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = {"profiler": "torch", "torch_profiler_dir": str(blocker / "traces")}
    llm = LLM(str(tiny_model_path()), device="cpu", kv_cache_memory=1 << 20, max_model_len=64,
              profiler_config=config)  # fmt: skip
    try:
        loop = EngineCoreLoop(llm.engine)
        for command in (StopProfile(), StartProfile(), StopProfile(), StartProfile()):
            loop.handle(command)
        replies = loop.take_outputs().profiler_replies
        assert [(r.action, r.status) for r in replies] == [
            ("stop", 400), ("start", 200), ("stop", 500), ("start", 200)]  # fmt: skip
        assert "no profile is running" in replies[0].error and replies[1].error is None
        assert "NotADirectoryError" in replies[2].error or "FileExistsError" in replies[2].error
        assert llm.engine.profiler.running  # the failed stop ended that profile; a new one runs
    finally:
        llm.close()


def test_the_table_sits_beside_its_trace() -> None:
    assert table_path("/p/parallm-core-7.12.pt.trace.json.gz") == Path("/p/parallm-core-7.12.txt")
    assert table_path("/p/parallm-core-7.12.pt.trace.json") == Path("/p/parallm-core-7.12.txt")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_profile_records_the_kernels_of_captured_steps(traces: Path) -> None:
    """Decode steps replay CUDA graphs; their kernels are in the trace and the table anyway."""
    config = {"profiler": "torch", "torch_profiler_dir": str(traces / "cuda")}
    llm = LLM(str(tiny_model_path()), device="cuda", max_model_len=256, profiler_config=config,
              kv_cache_memory=64 << 20)  # fmt: skip
    try:
        params = SamplingParams(max_tokens=16, ignore_eos=True, temperature=0)
        llm.generate([list(range(10, 40))] * 4, params, use_tqdm=False)  # graphs warm
        llm.start_profile()
        llm.generate([list(range(10, 40))] * 4, params, use_tqdm=False)
        trace = llm.stop_profile()
    finally:
        llm.close()
    events = _events(trace)
    kernels = [e for e in events if e.get("cat") == "kernel"]
    assert len(kernels) > 15 * 4  # 15 decode steps of the tiny model's kernels at least
    # Each graph-replayed decode step's range spans its kernels on the device: a step's device
    # time by shape, as serve_profile reads it.
    decode = [e for e in events if e.get("cat") == "gpu_user_annotation"
              and e.get("name") == "execute_context_0(0)_generation_4(4)"]  # fmt: skip
    assert len(decode) == 15 and all(e["dur"] > 0 for e in decode)
    assert "Self CUDA" in table_path(trace).read_text()
