"""``LLM(engine_process=True)``: the one engine steps in a process of its own (an engine core,
as the server runs it). Outputs equal the in-process engine's; its death fails the next
generate with an error naming it; closing it leaves no process behind."""

from __future__ import annotations

import multiprocessing
import os
import signal

import pytest

from parallm import LLM, SamplingParams
from parallm.cli import build_parser
from parallm.commands.engine_args import engine_kwargs

ENGINE = {"dtype": "float32", "device": "cpu", "max_model_len": 128, "block_size": 16,
          "kv_cache_memory": 8 << 20}  # fmt: skip
PARAMS = SamplingParams(n=2, temperature=0, max_tokens=10, ignore_eos=True, logprobs=1)
PROMPTS = [[5, 17, 42, 99, 3], [7, 8, 9], list(range(20, 60))]


def _samples(outs) -> list:
    return [
        [(c.token_ids, c.text, c.finish_reason, [list(d) for d in c.logprobs]) for c in o.outputs]
        for o in outs
    ]


def test_outputs_equal_the_in_process_engines_and_nothing_is_left(tiny_model_dir):
    path = str(tiny_model_dir("llama3"))
    want = _samples(LLM(path, **ENGINE).generate(PROMPTS, PARAMS, use_tqdm=False))
    llm = LLM(path, engine_process=True, **ENGINE)
    try:
        (core,) = multiprocessing.active_children()
        assert core.name == "parallm-engine-core" and core.pid != os.getpid()
        assert llm.engine.summary().startswith(f"engine process (pid {core.pid} on ")
        assert _samples(llm.generate(PROMPTS, PARAMS, use_tqdm=False)) == want
        one = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
        streamed = [o.outputs[0].token_ids for o in llm.stream(PROMPTS[2], one)]
        assert sum(streamed, []) == want[2][0][0]
    finally:
        llm.close()
    assert multiprocessing.active_children() == []


def test_a_killed_engine_process_fails_the_next_generate(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama3")), engine_process=True, **ENGINE)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    try:
        (core,) = multiprocessing.active_children()
        assert len(llm.generate([PROMPTS[0]], params, use_tqdm=False)) == 1
        os.kill(core.pid, signal.SIGKILL)
        core.join(30)
        message = r"the engine process \(pid \d+\) exited with code -9; the engine cannot"
        with pytest.raises(RuntimeError, match=message):
            llm.generate([PROMPTS[1]], params, use_tqdm=False)
        assert multiprocessing.active_children() == []
    finally:
        llm.close()


def test_a_bad_argument_is_a_value_error_from_the_engine_process(tiny_model_dir):
    with pytest.raises(ValueError, match=r"max_model_len must be in \[1, \d+\], got 1000000"):
        LLM(str(tiny_model_dir("llama3")), engine_process=True,
            **{**ENGINE, "max_model_len": 1_000_000})  # fmt: skip
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_engine_process_must_be_a_bool(tiny_model_dir, value):
    with pytest.raises(ValueError, match=rf"engine_process must be True or False, got {value!r}"):
        LLM(str(tiny_model_dir("llama3")), engine_process=value, **ENGINE)
    assert multiprocessing.active_children() == []


def test_bench_throughput_flag_reaches_the_engine():
    args = build_parser().parse_args(["bench", "throughput", "--engine-process"])
    assert engine_kwargs(args)["engine_process"] is True
    assert (
        engine_kwargs(build_parser().parse_args(["bench", "throughput"]))["engine_process"] is False
    )
    assert engine_kwargs(build_parser().parse_args(["generate", "x"]))["engine_process"] is False
