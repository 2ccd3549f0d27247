"""vLLM's routes beyond /v1: /tokenize, /detokenize, /version and /ping."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from server_support import MAX_MODEL_LEN, MODEL_NAME, client, post, running_server

import parallm
from parallm.server.launcher import ServerThread

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x = 1"}]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with running_server() as s:
        yield s


def _tokenizer(server: ServerThread) -> Any:
    return server.app.state.ctx.tokenizer


def test_tokenize_prompt(server: ServerThread) -> None:
    text = "def main():\n    return 42"
    expected = _tokenizer(server)(text)["input_ids"]
    response = post(server, "/tokenize", {"model": MODEL_NAME, "prompt": text})
    assert response.status_code == 200, response.text
    assert response.json() == {
        "count": len(expected),
        "max_model_len": MAX_MODEL_LEN,
        "tokens": expected,
        "token_strs": None,
    }


def test_tokenize_special_tokens_and_token_strings(server: ServerThread) -> None:
    tokenizer = _tokenizer(server)
    text = "<|begin_of_text|>print(1)"
    body = {"prompt": text, "add_special_tokens": False, "return_token_strs": True}
    out = post(server, "/tokenize", body).json()
    assert out["tokens"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert out["tokens"][0] == tokenizer.bos_token_id  # the special token in the text
    assert out["token_strs"] == tokenizer.convert_ids_to_tokens(out["tokens"])


def test_tokenize_messages_counts_what_chat_completions_bills(server: ServerThread) -> None:
    out = post(server, "/tokenize", {"model": MODEL_NAME, "messages": MESSAGES}).json()
    chat = client(server).chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=1)
    assert out["count"] == chat.usage.prompt_tokens == len(out["tokens"])
    text = _tokenizer(server).decode(out["tokens"])
    assert text.endswith("<|assistant|>\n") and "Be brief." in text


def test_detokenize_round_trips(server: ServerThread) -> None:
    text = "for i in range(3):\n    print(i)"
    ids = post(server, "/tokenize", {"prompt": text}).json()["tokens"]
    response = post(server, "/detokenize", {"model": MODEL_NAME, "tokens": ids})
    assert response.status_code == 200, response.text
    assert response.json() == {"prompt": _tokenizer(server).decode(ids)}
    assert text in response.json()["prompt"]


BAD = {
    "detokenize id -1": ("/detokenize", {"tokens": [1, -1]}, "tokens"),
    "detokenize id 2**63": ("/detokenize", {"tokens": [2**63]}, "tokens"),
    "detokenize id = vocab": ("/detokenize", {"tokens": [512]}, "tokens"),
    "detokenize no tokens": ("/detokenize", {"model": MODEL_NAME}, "tokens"),
    "tokenize nothing": ("/tokenize", {"model": MODEL_NAME}, "prompt"),
    "tokenize both": ("/tokenize", {"prompt": "x", "messages": MESSAGES}, "messages"),
    "tokenize bad role": ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]},
                          "messages.0.role"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_tokenization_requests_are_400(server: ServerThread, case: str) -> None:
    path, body, param = BAD[case]
    response = post(server, path, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_tokenization_routes_need_no_api_key_but_v1_does(server: ServerThread) -> None:
    # vLLM guards /v1 only.
    assert post(server, "/tokenize", {"prompt": "x"}, key=None).status_code == 200
    assert post(server, "/detokenize", {"tokens": [7]}, key=None).status_code == 200
    assert post(server, "/v1/completions", {"prompt": "x"}, key=None).status_code == 401


def test_version(server: ServerThread) -> None:
    response = httpx.get(server.url + "/version")
    assert response.status_code == 200
    assert response.json() == {"version": parallm.__version__}


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_ping_answers_like_health(server: ServerThread, method: str) -> None:
    assert httpx.request(method, server.url + "/ping").status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200
