"""The engine core's loop: commands in, deltas out, failures kept to the requests they hit."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch
from server_support import tiny_model_path

from parallm.engine.core.loop import EngineCoreLoop, run_core_loop
from parallm.engine.core.messages import (
    AbortAll,
    AddRequests,
    Command,
    CoreOutputs,
    CoreRequest,
    ResetPrefixCache,
    Shutdown,
)
from parallm.engine.engine import LLMEngine
from parallm.llm import LLM
from parallm.sampling_params import SamplingParams

PROMPT = list(range(20, 120))  # 100 tokens


@pytest.fixture(scope="module")
def engine() -> Iterator[LLMEngine]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield LLM(str(tiny_model_path()), device="cpu", kv_cache_memory=4 << 20,
                  max_model_len=256).engine  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def _request(
    request_id: str, prompt: list[int], max_tokens: int, stream: bool = True
) -> CoreRequest:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
    return CoreRequest(request_id, prompt, params, None, time.monotonic(), stream)


def _run_until_idle(loop: EngineCoreLoop) -> list[CoreOutputs]:
    batches = [loop.take_outputs()]
    while loop.has_work():
        loop.step()
        batches.append(loop.take_outputs())
    return batches


def test_deltas_leave_out_the_prompt_and_timings_and_count_every_step(engine: LLMEngine) -> None:
    loop = EngineCoreLoop(engine)
    loop.handle(AddRequests([_request("a", PROMPT, max_tokens=3)]))
    batches = _run_until_idle(loop)
    outputs = [out for b in batches for out in b.outputs]
    assert all(out.prompt is None and out.prompt_token_ids == [] for out in outputs)
    assert all((out.metrics is not None) == out.finished for out in outputs)
    assert outputs[-1].metrics.first_token_time is not None
    assert sum(len(out.outputs[0].token_ids) for out in outputs) == 3
    assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "length"
    assert not any(out.finished for out in outputs[:-1])
    # The prompt once, then the two decode steps that sample tokens 2 and 3.
    assert sum(n for b in batches for n in b.step_num_tokens) == len(PROMPT) + 2
    last = batches[-1]
    assert last.num_requests_taken == 1
    assert last.stats.num_blocks_in_use == 0 and last.stats.num_requests_running == 0


def test_a_request_not_streamed_comes_back_once_whole(engine: LLMEngine) -> None:
    """stream=False (the offline data-parallel engine's requests): one output, when the
    request finishes, with every token and text, as the in-process engine returns it."""
    engine.add_request("direct", PROMPT, _request("", PROMPT, 4).params)
    (direct,) = [out for _ in range(10) for out in engine.step()]  # 4 steps, one output
    want = direct.outputs[0]
    loop = EngineCoreLoop(engine)
    loop.handle(AddRequests([_request("whole", PROMPT, 4, stream=False)]))
    batches = _run_until_idle(loop)
    (out,) = [out for b in batches for out in b.outputs]
    assert out.finished and out.request_id == "whole"
    assert out.outputs[0].token_ids == want.token_ids and len(want.token_ids) == 4
    assert out.outputs[0].text == want.text
    assert out.outputs[0].finish_reason == "length"
    assert out.metrics is not None and out.prompt_token_ids == []


def test_reset_prefix_cache_applies_before_the_requests_sent_after_it(engine: LLMEngine) -> None:
    """Commands apply in order, so ResetPrefixCache needs no acknowledgement: a request sent
    after it computes its whole prompt afresh (and, without it, would have hit the cache)."""
    loop = EngineCoreLoop(engine)
    engine.reset_prefix_cache()

    def cached_tokens(*commands: Command) -> int:
        for command in commands:
            loop.handle(command)
        (out,) = [out for b in _run_until_idle(loop) for out in b.outputs if out.finished]
        return out.num_cached_tokens

    assert cached_tokens(AddRequests([_request("first", PROMPT, 2, stream=False)])) == 0
    hit = cached_tokens(AddRequests([_request("again", PROMPT, 2, stream=False)]))
    assert hit >= engine.kv.block_size  # the cache works: the prompt's full blocks hit
    reset_then_add = (ResetPrefixCache(), AddRequests([_request("fresh", PROMPT, 2)]))
    assert cached_tokens(*reset_then_add) == 0
    assert engine.kv.num_cached_blocks > 0  # and the fresh request cached its prompt again


def test_a_bad_request_is_rejected_alone(engine: LLMEngine) -> None:
    loop = EngineCoreLoop(engine)
    too_long = list(range(1, 300))
    loop.handle(AddRequests([_request("bad", too_long, 4), _request("good", PROMPT, 2)]))
    batches = _run_until_idle(loop)
    (rejected,) = [r for b in batches for r in b.rejected]
    assert (rejected.request_id, rejected.status) == ("bad", 400)
    assert "more than max_model_len (256)" in rejected.message
    finished = [out for b in batches for out in b.outputs if out.finished]
    assert [out.request_id for out in finished] == ["good"]
    assert batches[-1].num_requests_taken == 2


def test_abort_all_ends_every_request_with_its_last_output(engine: LLMEngine) -> None:
    loop = EngineCoreLoop(engine)
    loop.handle(AddRequests([_request("x", PROMPT, 100), _request("y", PROMPT[:50], 100)]))
    for _ in range(3):
        loop.step()
    loop.take_outputs()
    loop.handle(AbortAll())
    aborted = loop.take_outputs().aborted
    assert sorted(out.request_id for out in aborted) == ["x", "y"]
    assert all(out.finished and out.outputs[0].finish_reason == "abort" for out in aborted)
    assert not loop.has_work() and engine.kv.num_free_blocks == engine.kv.num_blocks


def test_a_step_that_raises_fails_its_requests_and_the_loop_goes_on(
    engine: LLMEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = EngineCoreLoop(engine)
    launch = engine.runner.launch
    calls = []

    def launch_failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return launch(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "launch", launch_failing_once)
    loop.handle(AddRequests([_request("doomed", PROMPT, 4)]))
    loop.step()
    (failure,) = loop.take_outputs().failures
    assert (failure.request_id, failure.message, failure.status) == (
        "doomed",
        "RuntimeError: boom",
        500,
    )
    assert not loop.has_work() and engine.kv.num_free_blocks == engine.kv.num_blocks
    loop.handle(AddRequests([_request("next", PROMPT, 2)]))
    finished = [out for b in _run_until_idle(loop) for out in b.outputs if out.finished]
    assert [out.request_id for out in finished] == ["next"]


def test_run_core_loop_blocks_when_idle_and_stops_on_shutdown(engine: LLMEngine) -> None:
    """Each batch of commands and each step is reported; with nothing to do the loop waits
    without a timeout (no spinning); Shutdown returns."""
    script: list[list[Command]] = [[AddRequests([_request("r", PROMPT, 3)])]]
    waits: list[float | None] = []
    emitted: list[CoreOutputs] = []
    loop = EngineCoreLoop(engine)

    def receive(wait_s: float | None) -> list[Command]:
        waits.append(wait_s)
        if script:
            return script.pop(0)
        if len(waits) > 1000:  # the loop spins: stop it, the asserts below then fail
            return [Shutdown()]
        if loop.has_work() or wait_s is not None:
            return []
        return [Shutdown()]  # once the loop waits for a command with nothing to do

    run_core_loop(loop, receive, emitted.append)
    finished = [out for b in emitted for out in b.outputs if out.finished]
    assert [out.request_id for out in finished] == ["r"]
    assert waits[0] is None and waits[-1] is None  # idle: wait for a command, however long
    assert waits[1:-1] and all(w == 0.0 for w in waits[1:-1])  # busy: look, do not wait
