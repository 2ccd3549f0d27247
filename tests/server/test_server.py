"""The OpenAI-compatible server, driven over HTTP by the official ``openai`` client."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from server_support import (
    MODEL_NAME,
    assert_serves,
    async_client,
    client,
    metrics,
    running_server,
    wait_until_idle,
)

from parallm.server.launcher import ServerThread

PROMPT = "def fibonacci(n):"
CHAT = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with running_server() as s:
        yield s


def _complete(server: ServerThread, **kwargs: object):
    kwargs.setdefault("model", MODEL_NAME)
    kwargs.setdefault("prompt", PROMPT)
    return client(server).completions.create(**kwargs)


def _chat(server: ServerThread, **kwargs: object):
    kwargs.setdefault("model", MODEL_NAME)
    kwargs.setdefault("messages", CHAT)
    return client(server).chat.completions.create(**kwargs)


def _joined_stream(chunks) -> tuple[dict[int, str], dict[int, str], object]:
    """(text by choice, finish_reason by choice, usage) of a completions or chat stream."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    usage = None
    for chunk in chunks:
        usage = chunk.usage or usage
        for c in chunk.choices:
            piece = c.text if hasattr(c, "text") else (c.delta.content or "")
            texts[c.index] = texts.get(c.index, "") + piece
            if c.finish_reason is not None:
                assert c.index not in reasons, "a choice finished twice"
                reasons[c.index] = c.finish_reason
    return texts, reasons, usage


def test_models_health_and_metrics(server: ServerThread) -> None:
    models = client(server).models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert httpx.get(server.url + "/health").status_code == 200
    m = metrics(server)
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                 "prefix_cache_hit_rate", "prompt_tokens_total", "generation_tokens_total",
                 "time_to_first_token_seconds_count", "inter_token_latency_seconds_count",
                 "e2e_request_latency_seconds_count"):  # fmt: skip
        assert "parallm:" + name in m, name


def test_completion_and_usage(server: ServerThread) -> None:
    before = metrics(server)
    out = _complete(server, max_tokens=8, seed=1, extra_body={"ignore_eos": True})
    assert out.object == "text_completion" and out.model == MODEL_NAME
    (choice,) = out.choices
    assert choice.finish_reason == "length" and choice.text
    assert out.usage.completion_tokens == 8
    assert out.usage.total_tokens == out.usage.prompt_tokens + 8
    after = metrics(server)
    assert after["parallm:generation_tokens_total"] - before["parallm:generation_tokens_total"] == 8
    assert after["parallm:prompt_tokens_total"] > before["parallm:prompt_tokens_total"]
    ttft = "parallm:time_to_first_token_seconds_count"
    assert after[ttft] == before[ttft] + 1
    assert after["parallm:inter_token_latency_seconds_count"] > 0


@pytest.mark.parametrize("n", [1, 3])
def test_completion_stream_equals_non_stream(server: ServerThread, n: int) -> None:
    kwargs = dict(max_tokens=12, seed=7, temperature=1.0, n=n)
    whole = _complete(server, **kwargs)
    stream = _complete(server, stream=True, stream_options={"include_usage": True}, **kwargs)
    texts, reasons, usage = _joined_stream(stream)
    assert sorted(texts) == list(range(n))
    assert texts == {c.index: c.text for c in whole.choices}
    assert reasons == {c.index: c.finish_reason for c in whole.choices}
    assert usage.model_dump() == whole.usage.model_dump()
    if n > 1:  # samples use seeds seed, seed+1, ...: they differ
        assert len(set(texts.values())) > 1


@pytest.mark.parametrize("n", [1, 2])
def test_chat_stream_equals_non_stream(server: ServerThread, n: int) -> None:
    kwargs = dict(max_completion_tokens=10, seed=3, n=n)
    whole = _chat(server, **kwargs)
    assert whole.object == "chat.completion"
    assert all(c.message.role == "assistant" for c in whole.choices)
    stream = _chat(server, stream=True, stream_options={"include_usage": True}, **kwargs)
    chunks = list(stream)
    assert [c.choices[0].delta.role for c in chunks[:n]] == ["assistant"] * n
    texts, reasons, usage = _joined_stream(chunks)
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert reasons == {c.index: c.finish_reason for c in whole.choices}
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens > 0


def test_usage_only_when_asked(server: ServerThread) -> None:
    chunks = list(_complete(server, max_tokens=3, stream=True))
    assert all(c.usage is None for c in chunks)


def test_stop_string(server: ServerThread) -> None:
    kwargs = dict(max_tokens=16, seed=5, extra_body={"ignore_eos": True})
    full = _complete(server, **kwargs).choices[0].text
    assert len(full) >= 8, full
    stop = full[4:7]
    expected = full[: full.find(stop)]
    for stream in (False, True):
        out = _complete(server, stop=[stop, "never-seen"], stream=stream, **kwargs)
        if stream:
            texts, reasons, _ = _joined_stream(out)
            text, reason = texts[0], reasons[0]
        else:
            text, reason = out.choices[0].text, out.choices[0].finish_reason
            assert out.choices[0].model_extra["stop_reason"] == stop
        assert (text, reason) == (expected, "stop")


def test_completion_logprobs(server: ServerThread) -> None:
    out = _complete(server, max_tokens=6, seed=2, logprobs=3, extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert all(x <= 0 for x in lp.token_logprobs)
    # The top 3 alternatives plus the sampled token when it is not among them (fewer when two
    # tokens decode to the same string, e.g. partial UTF-8 bytes).
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 1 <= len(top) <= 4 and token in top
        assert max(top.values()) >= logprob
    assert lp.text_offset == sorted(lp.text_offset)
    streamed = _complete(server, max_tokens=6, seed=2, logprobs=3, stream=True,
                         extra_body={"ignore_eos": True})  # fmt: skip
    tokens = [t for chunk in streamed for c in chunk.choices for t in c.logprobs.tokens]
    assert tokens == lp.tokens


def test_chat_logprobs(server: ServerThread) -> None:
    out = _chat(server, max_tokens=5, logprobs=True, top_logprobs=2, seed=4,
                extra_body={"ignore_eos": True})  # fmt: skip
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 5
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.logprob
    assert _chat(server, max_tokens=2).choices[0].logprobs is None


def test_echo_batch_and_token_prompts(server: ServerThread) -> None:
    out = _complete(server, prompt=["x = 1", "import os"], n=2, max_tokens=3, echo=True)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text.startswith("x = 1")
    assert out.choices[3].text.startswith("import os")
    ids = _complete(server, prompt=[[10, 20, 30], [40, 50]], max_tokens=2)
    assert len(ids.choices) == 2
    assert ids.usage.prompt_tokens == 5


def test_concurrent_requests_all_complete(server: ServerThread) -> None:
    async def run() -> list:
        api = async_client(server)
        calls = [
            api.completions.create(
                model=MODEL_NAME,
                prompt=f"{PROMPT} # {i}",
                max_tokens=8 + i,
                seed=i,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            for i in range(12)
        ]
        calls += [
            api.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=5, stream=True)
            for _ in range(4)
        ]
        results = await asyncio.gather(*calls)
        streams = [[chunk async for chunk in s] for s in results[12:]]
        await api.close()
        return results[:12] + streams

    results = asyncio.run(run())
    for i, out in enumerate(results[:12]):
        assert out.usage.completion_tokens == 8 + i
    for chunks in results[12:]:
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert wait_until_idle(server)["parallm:kv_cache_blocks_in_use"] == 0
    assert_serves(server)
