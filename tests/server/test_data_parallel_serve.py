"""The server over two data-parallel engine cores (``parallm serve --data-parallel-size 2``),
one server for the module: greedy answers equal one engine's, on both replicas; prompts that
share a long prefix go to the replica that caches it; a client that goes away frees its
blocks on the replica that ran it; /metrics labels each replica's counters."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import httpx
import pytest
import torch
from server_support import API_KEY, MODEL_NAME, client, tiny_model_path

from parallm import LLM, SamplingParams
from parallm.server.app import build_app
from parallm.server.launcher import ServerThread, start_engine_cores

CONTEXT = 2048
ENGINE_KWARGS = dict(device="cpu", kv_cache_memory=8 << 20, max_model_len=CONTEXT)
BLOCK_SIZE = 16
SHARED = list(range(10, 106))  # 96 tokens: six full blocks
PROMPTS = ["def alpha(x):", "class Beta:", "import gamma", "x = [1, 2"]
CHAT = [{"role": "user", "content": "Say something about data parallelism."}]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cores = start_engine_cores(
        num_threads=1, model=str(tiny_model_path()), data_parallel_size=2, **ENGINE_KWARGS
    )
    app = build_app(cores, MODEL_NAME, api_key=API_KEY, max_num_waiting=64, log_stats=False)
    try:
        with ServerThread(app, drain_timeout_s=2.0) as s:
            yield s
    finally:
        torch.set_num_threads(threads)
        for core in cores:  # the app's shutdown stopped them, unless it never started
            core.stop()


@pytest.fixture(scope="module")
def one_engine() -> Iterator[LLM]:
    llm = LLM(model=str(tiny_model_path()), **ENGINE_KWARGS)
    yield llm
    llm.close()


GREEDY = dict(max_tokens=8, temperature=0, extra_body={"ignore_eos": True})


def _greedy(llm: LLM, prompts: list) -> list[str]:
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    return [out.outputs[0].text for out in llm.generate(prompts, params, use_tqdm=False)]


def per_engine(server: ServerThread) -> dict[tuple[str, str], float]:
    """``/metrics`` samples that carry an engine label, as {(name, engine): value}."""
    values = {}
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        match = re.match(r'^([\w:]+)\{[^}]*engine="(\d+)"[^}]*\} (\S+)$', line)
        if match:
            values[match.group(1), match.group(2)] = float(match.group(3))
    return values


def _wait_for(server: ServerThread, done, timeout_s: float = 30.0) -> dict:
    """Poll the per-engine metrics until ``done(metrics)``; the deadline only bounds a failure."""
    deadline = time.monotonic() + timeout_s
    while not done(m := per_engine(server)):
        assert time.monotonic() < deadline, m
        time.sleep(0.02)
    return m


def _idle(engine: str):
    return lambda m: (m["parallm:kv_cache_blocks_in_use", engine] == 0
                      and m["parallm:num_requests_running", engine] == 0)  # fmt: skip


QUERIES = "parallm:prefix_cache_queries_total"
HITS = "parallm:prefix_cache_hits_total"


def test_completions_equal_one_engines_and_use_both_replicas(
    server: ServerThread, one_engine: LLM
) -> None:
    expected = _greedy(one_engine, PROMPTS)
    api = client(server)
    before = per_engine(server)
    out = api.completions.create(model=MODEL_NAME, prompt=PROMPTS, **GREEDY)
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == expected
    streamed = [""] * len(PROMPTS)
    for chunk in api.completions.create(model=MODEL_NAME, prompt=PROMPTS, stream=True, **GREEDY):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == expected
    after = per_engine(server)
    # The prompts of one request were spread over both replicas (the least loaded first).
    for engine in ("0", "1"):
        assert after[QUERIES, engine] > before.get((QUERIES, engine), 0), after


def test_chat_equals_one_engines(server: ServerThread, one_engine: LLM) -> None:
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    (expected,) = one_engine.chat(CHAT, params, use_tqdm=False)
    api = client(server)
    out = api.chat.completions.create(model=MODEL_NAME, messages=CHAT, **GREEDY)
    assert out.choices[0].message.content == expected.outputs[0].text
    chunks = api.chat.completions.create(model=MODEL_NAME, messages=CHAT, stream=True, **GREEDY)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.outputs[0].text


def _long_stream(server: ServerThread, prompt: list[int]):
    """A completion stream that runs for thousands of steps, and its engine request's id."""
    stream = client(server).completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=CONTEXT - 64, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    first = next(iter(stream))
    return stream, f"{first.id}-0"


def test_prompts_sharing_a_prefix_go_to_the_replica_that_caches_it(server: ServerThread) -> None:
    engine = server.app.state.ctx.engine
    api = client(server)
    _wait_for(server, lambda m: _idle("0")(m) and _idle("1")(m))
    # Replica 0 is busy, so the first prompt with the prefix goes to replica 1.
    hold, held_id = _long_stream(server, [500, 501, 502])
    assert engine.replica_of(held_id) == 0
    api.completions.create(model=MODEL_NAME, prompt=[*SHARED, 1], max_tokens=2)
    hold.close()
    mid = _wait_for(server, _idle("0"))
    # Both idle: the least loaded would be replica 0, but replica 1 caches the prefix.
    for suffix in (2, 3):
        api.completions.create(model=MODEL_NAME, prompt=[*SHARED, suffix], max_tokens=2)
    after = per_engine(server)
    assert after[QUERIES, "0"] == mid[QUERIES, "0"]
    assert after[HITS, "1"] - mid[HITS, "1"] == 2 * len(SHARED)


def test_a_client_leaving_frees_the_blocks_of_the_replica_that_ran_it(
    server: ServerThread,
) -> None:
    engine = server.app.state.ctx.engine
    on_0, id_0 = _long_stream(server, [400, 401])
    on_1, id_1 = _long_stream(server, [402, 403])
    assert (engine.replica_of(id_0), engine.replica_of(id_1)) == (0, 1)
    on_1.close()  # the client goes away
    m = _wait_for(server, _idle("1"))
    assert m["parallm:num_requests_running", "0"] == 1  # the other replica's request runs on
    assert engine.replica_of(id_1) is None and engine.replica_of(id_0) == 0
    on_0.close()
    _wait_for(server, _idle("0"))
    assert engine.router.load == [0, 0] and engine._tracked == {}
