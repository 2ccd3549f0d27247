"""Bad input (400), a bad key (401), overload (429) and a failing request (500): each gets an
OpenAI-style error, and the server keeps serving everyone else."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import openai
import pytest
from server_support import (
    MAX_MODEL_LEN,
    MODEL_NAME,
    assert_serves,
    client,
    metrics,
    post,
    running_server,
    wait_until_idle,
)

from parallm.engine import output_processor
from parallm.server.launcher import ServerThread

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hello"}]
LONG_PROMPT = list(range(10, 10 + MAX_MODEL_LEN + 1))


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with running_server() as s:
        yield s


def _completion(**fields: object) -> dict:
    return {"model": MODEL_NAME, "prompt": "x = 1", "max_tokens": 2, **fields}


def _chat(**fields: object) -> dict:
    return {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 2, **fields}


_TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


BAD_REQUESTS = {
    "malformed json": (COMPLETIONS, '{"prompt": "x", ', None, "JSON"),
    "not an object": (COMPLETIONS, "[1, 2]", None, "JSON object"),
    "empty body": (COMPLETIONS, "", None, "empty"),
    "wrong type": (COMPLETIONS, _completion(max_tokens="10"), "max_tokens", "integer"),
    "wrong prompt type": (COMPLETIONS, _completion(prompt=3.5), "prompt", "prompt"),
    "missing prompt": (COMPLETIONS, {"model": MODEL_NAME}, "prompt", "required"),
    "temperature < 0": (COMPLETIONS, _completion(temperature=-0.5), "temperature", "temperature"),
    "top_p > 1": (COMPLETIONS, _completion(top_p=1.5), "top_p", "top_p"),
    "n = 0": (COMPLETIONS, _completion(n=0), "n", "greater than or equal to 1"),
    "max_tokens = 0": (COMPLETIONS, _completion(max_tokens=0), "max_tokens", "1"),
    "logprobs > 20": (COMPLETIONS, _completion(logprobs=21), "logprobs", "20"),
    "penalty > 2": (COMPLETIONS, _completion(presence_penalty=3), "presence_penalty", "[-2, 2]"),
    "prompt too long": (COMPLETIONS, _completion(prompt=LONG_PROMPT), "prompt", "context length"),
    "no room to generate": (
        COMPLETIONS,
        _completion(prompt=LONG_PROMPT[:200], max_tokens=100),
        "prompt",
        "context length",
    ),  # fmt: skip
    "token id out of vocab": (COMPLETIONS, _completion(prompt=[1, 10**6]), "prompt", "[0, "),
    "empty prompt list": (COMPLETIONS, _completion(prompt=[]), "prompt", "empty"),
    "stream_options without stream": (
        COMPLETIONS,
        _completion(stream_options={"include_usage": True}),
        "stream_options",
        "stream",
    ),  # fmt: skip
    "missing messages": (CHAT, {"model": MODEL_NAME}, "messages", "required"),
    "empty messages": (CHAT, _chat(messages=[]), "messages", "empty"),
    "bad role": (
        CHAT,
        _chat(messages=[{"role": "wizard", "content": "x"}]),
        "messages.0.role",
        "role",
    ),  # fmt: skip
    "chat prompt too long": (
        CHAT,
        _chat(messages=[{"role": "user", "content": "word " * 400}]),
        "messages",
        "context length",
    ),  # fmt: skip
    "top_logprobs without logprobs": (CHAT, _chat(top_logprobs=2), "top_logprobs", "logprobs"),
    # Ids outside the vocabulary are refused before anything decodes them.
    "token id -1": (COMPLETIONS, _completion(prompt=[1, -1]), "prompt", "[0, 512)"),
    "token id 2**63": (COMPLETIONS, _completion(prompt=[1, 2**63]), "prompt", "[0, 512)"),
    "token id 2**64 echoed": (
        COMPLETIONS,
        _completion(prompt=[[5, 6], [1, 2**64]], echo=True),
        "prompt",
        "[0, 512)",
    ),
    "stop token id out of vocab": (
        COMPLETIONS,
        _completion(stop_token_ids=[3, 512]),
        "stop_token_ids",
        "[0, 512)",
    ),
    "chat stop token id -1": (CHAT, _chat(stop_token_ids=[-1]), "stop_token_ids", "[0, 512)"),
    "seed 2**64": (COMPLETIONS, _completion(seed=2**64), "seed", "seed"),
    "chat seed -1": (CHAT, _chat(seed=-1), "seed", "seed"),
    # Output constraints that do not exist yet are refused, not silently ignored.
    "tools": (CHAT, _chat(tools=[_TOOL]), "tools", "not supported"),
    "tool_choice required": (CHAT, _chat(tool_choice="required"), "tool_choice", "none"),
    "named tool_choice": (
        CHAT,
        _chat(tool_choice={"type": "function", "function": {"name": "f"}}),
        "tool_choice",
        "not supported",
    ),
    "functions": (CHAT, _chat(functions=[_TOOL["function"]]), "functions", "not supported"),
    "json mode": (
        CHAT,
        _chat(response_format={"type": "json_object"}),
        "response_format",
        '"text"',
    ),
    "json schema on completions": (
        COMPLETIONS,
        _completion(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
        "response_format",
        "not supported",
    ),
    "guided_json": (COMPLETIONS, _completion(guided_json={"type": "object"}), "guided_json", ""),
    "guided_choice": (CHAT, _chat(guided_choice=["yes", "no"]), "guided_choice", ""),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_invalid_request_is_400_naming_the_problem(server: ServerThread, case: str) -> None:
    path, body, param, needle = BAD_REQUESTS[case]
    response = post(server, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert needle.lower() in error["message"].lower(), error["message"]


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT, "/tokenize"])
def test_unknown_model_is_404_model_not_found(server: ServerThread, path: str) -> None:
    body = {"model": "gpt-9", "prompt": "x"} if path == "/tokenize" else None
    body = body or (_completion if path == COMPLETIONS else _chat)(model="gpt-9")
    response = post(server, path, body)
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("model", "model_not_found")
    assert error["type"] == "invalid_request_error"
    assert "gpt-9" in error["message"]


def test_sdk_raises_not_found_for_unknown_model(server: ServerThread) -> None:
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(model="gpt-9", messages=MESSAGES, max_tokens=2)
    assert_serves(server)


# What clients send by default when no tool or format is wanted: served as usual.
ASKS_FOR_NOTHING = {
    "tool_choice none": _chat(tool_choice="none"),
    "tool_choice auto, no tools": _chat(tools=[], tool_choice="auto"),
    "null tools": _chat(tools=None, functions=None, function_call="none"),
    "text format": _chat(response_format={"type": "text"}),
    "completions text format": _completion(response_format={"type": "text"}),
}


@pytest.mark.parametrize("case", list(ASKS_FOR_NOTHING))
def test_default_tool_and_format_values_are_served(server: ServerThread, case: str) -> None:
    body = ASKS_FOR_NOTHING[case]
    response = post(server, CHAT if "messages" in body else COMPLETIONS, body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1


def test_ignored_fields_are_logged_once_per_request(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="parallm.server")
    body = _completion(my_flag=True, another={"x": 1})
    assert post(server, COMPLETIONS, body).status_code == 200
    ignored = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert ignored == [
        "The following fields were present in the request but ignored: ['another', 'my_flag']"
    ]


def test_sdk_raises_bad_request_and_server_survives(server: ServerThread) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client(server).completions.create(model=MODEL_NAME, prompt="x", temperature=-1)
    assert info.value.body["param"] == "temperature"
    assert_serves(server)


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_missing_or_wrong_key_is_401(server: ServerThread, key: str | None) -> None:
    response = post(server, COMPLETIONS, _completion(), key=key)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    if key is not None:  # the SDK itself refuses to send no key at all
        with pytest.raises(openai.AuthenticationError):
            client(server, api_key=key).models.list()
    assert_serves(server)


def test_overload_is_429_with_retry_after() -> None:
    # One running sequence at a time and one waiting slot: the third request is refused.
    # The first request runs for thousands of steps: it is still running while we test.
    with running_server(max_num_waiting=1, max_num_seqs=1, max_model_len=2048) as server:
        api = client(server)
        long = {"max_tokens": 2000, "extra_body": {"ignore_eos": True}}
        first = api.completions.create(model=MODEL_NAME, prompt="a", stream=True, **long)
        next(iter(first))  # it runs
        second = api.completions.create(model=MODEL_NAME, prompt="b", stream=True, **long)
        response = post(server, COMPLETIONS, _completion())
        assert response.status_code == 429
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            api.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=2)
        first.close()
        second.close()
        assert wait_until_idle(server)["parallm:kv_cache_blocks_in_use"] == 0
        assert metrics(server)["parallm:request_rejected_total"] == 2
        assert_serves(server)


BOOM = "<<boom>>"


class _FaultyDetokenizer(output_processor.IncrementalDetokenizer):
    """Raises for requests that carry the BOOM stop string: a fault inside one request."""

    def add_tokens(self, token_ids: list[int]) -> str | None:
        if BOOM in self._stops:
            raise RuntimeError("injected detokenizer fault")
        return super().add_tokens(token_ids)


@pytest.fixture(scope="module")
def in_process_server() -> Iterator[ServerThread]:
    """The engine on a thread of this process, where a test can patch it."""
    with running_server(multiprocess=False) as s:
        yield s


def test_fault_in_one_request_is_500_and_engine_survives(
    in_process_server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = in_process_server
    monkeypatch.setattr(output_processor, "IncrementalDetokenizer", _FaultyDetokenizer)
    api = client(server)
    with pytest.raises(openai.InternalServerError) as info:
        api.completions.create(model=MODEL_NAME, prompt="x", max_tokens=4, stop=[BOOM])
    assert "injected detokenizer fault" in info.value.message
    assert info.value.body["type"] == "server_error"
    stream = api.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=4, stop=[BOOM], stream=True
    )
    with pytest.raises(openai.APIError, match="injected"):
        list(stream)
    m = wait_until_idle(server)
    assert m["parallm:kv_cache_blocks_in_use"] == 0
    assert m["parallm:request_failed_total"] == 2
    assert_serves(server)
