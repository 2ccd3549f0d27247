"""A stream whose consumer lags gets the deltas it missed merged into one chunk: every token
exactly once, in order, with the right finish_reason and usage. The engine core is a fake
that the test plays; the server, its event loop and the HTTP stream are real."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from parallm.engine.core.client import EngineView
from parallm.engine.core.messages import AddRequests, CoreOutputs, EngineInfo
from parallm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from parallm.server.app import build_app
from parallm.server.coalesce import merge_delta
from parallm.server.launcher import ServerThread

INFO = EngineInfo(model="fake", max_model_len=1024, vocab_size=1000, max_num_seqs=8,
                  num_blocks=64, summary="fake")  # fmt: skip
PROMPT = [5, 6, 7]


class FakeCore:
    """An engine core that records what it is sent; the test plays its outputs."""

    def __init__(self) -> None:
        self.info = INFO
        self.engine = EngineView(INFO, None)
        self.sent: list = []
        self.on_outputs: Callable[[CoreOutputs], None] | None = None

    def start(self, on_outputs, on_death) -> None:
        self.on_outputs = on_outputs

    def send(self, command) -> None:
        self.sent.append(command)

    def is_alive(self) -> bool:
        return True

    def stop(self, timeout_s: float = 10.0) -> None:
        pass

    def added(self) -> list[str]:
        return [r.request_id for c in self.sent if isinstance(c, AddRequests) for r in c.requests]


def _delta(request_id: str, step: int, n: int, last: bool) -> RequestOutput:
    """Step ``step``'s delta: each sample one token (id 100*sample + step, text "s<sample>t<step> ")."""
    samples = [
        CompletionOutput(i, f"s{i}t{step} ", [100 * i + step],
                         finish_reason="length" if last else None)
        for i in range(n)
    ]  # fmt: skip
    metrics = RequestMetrics(0.0, 0.0, 0.0, 0.0, 0.0) if last else None  # as the core sends
    return RequestOutput(request_id, None, [], samples, finished=last, metrics=metrics)


class StreamRead(threading.Thread):
    """Reads one streamed completion's events."""

    def __init__(self, url: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.events: list[str] = []
        self.first = threading.Event()

    def run(self) -> None:
        with httpx.stream("POST", self.url + "/v1/completions", json=self.body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    self.events.append(line.removeprefix("data: "))
                    self.first.set()


def _wait_for(predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.005)


@pytest.mark.parametrize("n", [1, 2])
def test_a_lagging_stream_gets_every_token_once_in_order(n: int) -> None:
    core = FakeCore()
    app = build_app([core], "fake", log_stats=False)
    num_steps = 12
    with ServerThread(app) as server:
        body = {"prompt": PROMPT, "max_tokens": num_steps, "n": n, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        reader = StreamRead(server.url, body)
        reader.start()
        _wait_for(lambda: core.added())
        (request_id,) = core.added()
        core.on_outputs(CoreOutputs(outputs=[_delta(request_id, 0, n, last=False)]))
        assert reader.first.wait(30)
        # The event loop is held up while the other steps' outputs arrive: its consumer lags.
        loop = app.state.ctx.engine._tracked[request_id].stream._loop
        blocked, release = threading.Event(), threading.Event()
        loop.call_soon_threadsafe(lambda: (blocked.set(), release.wait(30)))
        assert blocked.wait(30)
        for step in range(1, num_steps):
            last = step == num_steps - 1
            core.on_outputs(CoreOutputs(outputs=[_delta(request_id, step, n, last)]))
        release.set()
        reader.join(30)
    assert reader.events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in reader.events[:-1]]
    *content, usage = chunks
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": len(PROMPT), "completion_tokens": n * num_steps,
        "total_tokens": len(PROMPT) + n * num_steps,
    }  # fmt: skip
    for i in range(n):
        mine = [c["choices"][0] for c in content if c["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == "".join(f"s{i}t{s} " for s in range(num_steps))
        assert [c["finish_reason"] for c in mine] == [None] * (len(mine) - 1) + ["length"]
        assert len(mine) == 2  # the first step's chunk, then one for the eleven it missed


def test_merge_delta_extends_text_ids_and_logprobs_and_keeps_the_first_finish() -> None:
    lp = {1: Logprob(-0.5, 1, "a")}
    first = RequestOutput("r", None, [], [
        CompletionOutput(0, "a", [1], -0.5, [lp]),
        CompletionOutput(1, "b", [2], finish_reason="stop", stop_reason=2),
    ], prompt_logprobs=[None])  # fmt: skip
    second = RequestOutput("r", None, [], [
        CompletionOutput(0, "c", [3], -1.5, [lp], finish_reason="length"),
        CompletionOutput(1, "", [], finish_reason="stop", stop_reason=2),  # repeated: finished
    ], finished=True, num_cached_tokens=16)  # fmt: skip
    ids_before = first.outputs[0].token_ids
    merged = merge_delta(first, second)
    running, done = merged.outputs
    assert (running.text, running.token_ids, running.logprobs) == ("ac", [1, 3], [lp, lp])
    assert running.cumulative_logprob == -1.5 and running.finish_reason == "length"
    assert (done.text, done.token_ids, done.finish_reason) == ("b", [2], "stop")
    assert merged.finished and merged.num_cached_tokens == 16 and merged.prompt_logprobs == [None]
    assert ids_before == [1]  # the merged list is a new one
