"""The engine core's messages survive msgpack unchanged (types included), and carry plain data."""

from __future__ import annotations

import pickle

import msgspec
import pytest

from parallm.engine.core import messages as m
from parallm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from parallm.sampling_params import MAX_SEED, SamplingParams


def _round_trip_command(command: m.Command) -> m.Command:
    return m.command_decoder().decode(m.encode(command))


def _round_trip_core(message: m.CoreMessage) -> m.CoreMessage:
    return m.core_message_decoder().decode(m.encode(message))


def test_commands_round_trip() -> None:
    params = SamplingParams(
        n=2, temperature=0.7, top_k=5, seed=MAX_SEED, max_tokens=None, stop=["\n\n", "END"],
        stop_token_ids=[7], logprobs=3, prompt_logprobs=1, skip_special_tokens=False,
    )  # fmt: skip
    add = m.AddRequests([
        m.CoreRequest("a", [1, 2, 3], params, "the prompt", 12.5),
        m.CoreRequest("b", [4], SamplingParams(), None, 13.0, stream=False),
    ])  # fmt: skip
    commands = (add, m.AbortRequests(["a", "b"]), m.AbortAll(), m.ResetPrefixCache(), m.Shutdown())
    for command in commands:
        assert _round_trip_command(command) == command
    decoded = _round_trip_command(add).requests[0].params
    assert type(decoded) is SamplingParams
    assert decoded == params and decoded.seed == MAX_SEED and decoded.max_tokens is None
    assert [r.stream for r in _round_trip_command(add).requests] == [True, False]


def _output() -> RequestOutput:
    top = {17: Logprob(-0.25, 1, "ab"), 3: Logprob(-1.5, 2, None)}
    sample = CompletionOutput(
        index=1, text="ab", token_ids=[17, 2], cumulative_logprob=-0.75, logprobs=[top, top],
        finish_reason="stop", stop_reason=2,
    )  # fmt: skip
    running = CompletionOutput(index=0, text="x", token_ids=[9], stop_reason="END")
    return RequestOutput(
        request_id="r1", prompt=None, prompt_token_ids=[], outputs=[running, sample],
        finished=False, num_cached_tokens=16,
        prompt_logprobs=[None, {5: Logprob(-3.0, 4, "q")}],
        metrics=RequestMetrics(1.0, 1.5, 2.0, None, None), error=None,
    )  # fmt: skip


def test_outputs_round_trip() -> None:
    stats = m.EngineStats(num_requests_running=2, num_blocks=64, num_blocks_in_use=9,
                          spec_accepted_per_position=(5, 3, 1))  # fmt: skip
    batch = m.CoreOutputs(
        outputs=[_output()], aborted=[RequestOutput("r2", None, [], error=None, finished=True)],
        rejected=[m.RequestFailure("r3", "ValueError: prompt must not be empty", 400)],
        failures=[m.RequestFailure("r4", "RuntimeError: boom")], num_requests_taken=4,
        step_num_tokens=[37, 2], stats=stats,
    )  # fmt: skip
    decoded = _round_trip_core(batch)
    assert decoded == batch
    out = decoded.outputs[0]
    assert type(out) is RequestOutput and type(out.outputs[1]) is CompletionOutput
    assert type(out.outputs[1].logprobs[0][17]) is Logprob and out.outputs[1].stop_reason == 2
    assert out.outputs[0].stop_reason == "END" and type(out.metrics) is RequestMetrics
    assert decoded.stats.spec_accepted_per_position == (5, 3, 1)


def test_start_up_messages_round_trip() -> None:
    info = m.EngineInfo("tiny", 256, 512, 32, 100, "parallm: tiny ...")
    for message in (
        m.Ready(info, pickle.dumps({"vocab": 1}), 1234),
        m.Ready(info, None, 1),
        m.StartupFailed("ValueError", "max_model_len must be > 0", "Traceback ..."),
        m.CoreFailed("the engine core loop died: KeyError('x')"),
    ):
        assert _round_trip_core(message) == message


def test_messages_hold_plain_data_only() -> None:
    """An output is msgpack of plain values (no pickled objects): generic decoding reads it."""
    plain = msgspec.msgpack.decode(m.encode(m.CoreOutputs(outputs=[_output()])))
    assert plain[0] == "CoreOutputs"
    assert "r1" in str(plain) and "ab" in str(plain)


def test_a_command_of_the_wrong_shape_is_refused() -> None:
    with pytest.raises(msgspec.ValidationError):
        m.command_decoder().decode(msgspec.msgpack.encode(["AbortRequests", "not a list"]))


def test_token_only_outputs_travel_as_columns_and_come_back_whole() -> None:
    token_only = [
        RequestOutput(f"t{i}", None, [], [CompletionOutput(0, "", [i, i + 1])],
                      num_cached_tokens=16 * i)
        for i in range(3)
    ]  # fmt: skip
    finished = RequestOutput("f", None, [], [CompletionOutput(0, "", [9], finish_reason="length")],
                             finished=True)  # fmt: skip
    batch = m.CoreOutputs(outputs=[token_only[0], _output(), token_only[1], finished,
                                   token_only[2]])  # fmt: skip
    sent = m.encode(batch)
    generic = msgspec.msgpack.decode(sent)
    assert generic[-1] == [["t0", "t1", "t2"], [[0, 1], [1, 2], [2, 3]], [0, 16, 32]]
    assert [out["request_id"] for out in generic[1]] == [
        "r1",
        "f",
    ]  # the others travel as columns only
    decoded = _round_trip_core(batch)
    by_id = {out.request_id: out for out in decoded.outputs}
    assert len(decoded.outputs) == 5
    assert by_id == {out.request_id: out for out in batch.outputs}
    assert all(type(out) is RequestOutput for out in decoded.outputs)
    assert decoded.token_deltas == m.TokenDeltas()
