"""Input limits: a request body over the limit is refused (413) before it is read, and prompt
text that cannot fit the context is refused (400) before it is tokenized."""

from __future__ import annotations

import json
import math
import socket
import sys
import unicodedata
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from server_support import (
    API_KEY,
    MAX_MODEL_LEN,
    MODEL_NAME,
    assert_serves,
    post,
    running_server,
)
from tokenizer_factory import build_test_tokenizer
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from parallm.server.chars_per_token import MAX_CANONICAL_DECOMPOSITION, max_chars_per_token
from parallm.server.launcher import ServerThread
from parallm.tokenizer import id_tokenizer

LIMIT = 4096  # bytes of request body this module's server accepts
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with running_server(max_request_body_bytes=LIMIT) as s:
        yield s


def _raw_exchange(server: ServerThread, head: str, body: bytes = b"") -> tuple[int, dict]:
    """Send a request's head and part of its body over a raw socket, never finishing the body,
    and read the response: only a server that answers before reading the body answers at all."""
    with socket.create_connection((server.host, server.port), timeout=30) as sock:
        sock.sendall(head.encode() + body)
        response = b""
        while b"\r\n\r\n" not in response or not _complete(response):
            chunk = sock.recv(65536)  # a server waiting for the rest of the body times out here
            if not chunk:
                break
            response += chunk
    status_line, _, rest = response.partition(b"\r\n")
    body_start = rest.index(b"\r\n\r\n") + 4
    return int(status_line.split()[1]), json.loads(rest[body_start:])


def _complete(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def _head(extra: str) -> str:
    return (
        f"POST {COMPLETIONS} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\n{extra}\r\n"
    )


def _assert_too_large(status: int, body: dict) -> None:
    assert status == 413, body
    assert body["error"]["code"] == "request_too_large"
    assert str(LIMIT) in body["error"]["message"]


def test_declared_body_over_limit_is_413_before_it_is_read(server: ServerThread) -> None:
    # A gigabyte is announced and none of it sent.
    status, body = _raw_exchange(server, _head(f"Content-Length: {10**9}\r\n"))
    _assert_too_large(status, body)
    assert_serves(server)


def test_chunked_body_over_limit_is_413_before_its_end(server: ServerThread) -> None:
    # No length is announced; one chunk crosses the limit and the body never ends.
    chunk = b"x" * (LIMIT + 1)
    status, body = _raw_exchange(
        server, _head("Transfer-Encoding: chunked\r\n"), b"%x\r\n%s\r\n" % (len(chunk), chunk)
    )
    _assert_too_large(status, body)
    assert_serves(server)


def test_client_sending_a_body_over_limit_gets_413(server: ServerThread) -> None:
    prompt = "x" * LIMIT
    response = post(server, COMPLETIONS, {"model": MODEL_NAME, "prompt": prompt})
    _assert_too_large(response.status_code, response.json())
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_bodies_within_limit_are_served(server: ServerThread) -> None:
    body = json.dumps({"model": MODEL_NAME, "prompt": "def f():", "max_tokens": 2}).encode()

    def chunks() -> Iterator[bytes]:  # no Content-Length: sent chunked
        yield from (body[i : i + 7] for i in range(0, len(body), 7))

    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    for content in (body, chunks()):
        response = httpx.post(server.url + COMPLETIONS, content=content, headers=headers)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 2


class _SpyTokenizer:
    """The engine's tokenizer, recording the text of every encode call."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.encoded: list[str] = []

    def __call__(self, text: str, *args: Any, **kwargs: Any) -> Any:
        self.encoded.append(text)
        return self._tokenizer(text, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


@pytest.fixture(scope="module")
def big_body_server() -> Iterator[ServerThread]:
    with running_server() as s:
        yield s


def _spy(server: ServerThread, monkeypatch: pytest.MonkeyPatch) -> _SpyTokenizer:
    engine = server.app.state.ctx.engine.engine
    spy = _SpyTokenizer(engine.tokenizer)
    monkeypatch.setattr(engine, "tokenizer", spy)
    return spy


def test_text_too_long_for_the_context_is_refused_untokenized(
    big_body_server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = big_body_server
    spy = _spy(server, monkeypatch)
    # A byte-level BPE: no token stands for more characters than its longest piece has.
    chars_per_token = max(map(len, spy.get_vocab()))
    too_long = "a" * (MAX_MODEL_LEN * chars_per_token + 1)
    cases = {
        "prompt": (COMPLETIONS, {"prompt": too_long, "max_tokens": 1}),
        "messages": (CHAT, {"messages": [{"role": "user", "content": too_long}]}),
    }
    for param, (path, fields) in cases.items():
        response = post(server, path, {"model": MODEL_NAME, **fields})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["param"], error["code"]) == (param, "context_length_exceeded")
        assert "characters" in error["message"]
    assert all(too_long not in text for text in spy.encoded)
    assert server.app.state.ctx.max_chars_per_token == chars_per_token
    assert_serves(server)


def test_longest_tokens_that_fit_are_served(big_body_server: ServerThread) -> None:
    """The character bound refuses nothing that fits: a prompt of the longest token repeated
    as often as the context allows sits exactly on the bound and is served."""
    server = big_body_server
    ctx = server.app.state.ctx
    vocab = ctx.tokenizer.get_vocab()
    longest = ctx.tokenizer.decode([vocab[max(vocab, key=len)]])  # "\n" and 19 spaces
    assert len(longest) == ctx.max_chars_per_token
    max_tokens = 2
    prompt = longest * (MAX_MODEL_LEN - max_tokens)
    assert len(ctx.tokenizer(prompt)["input_ids"]) == MAX_MODEL_LEN - max_tokens
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
    response = post(server, COMPLETIONS, body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == MAX_MODEL_LEN - max_tokens


# ---- the characters-per-token bound itself -----------------------------------------------------

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n" * 2,
    "     \n\n\t\t    " * 4,
    "Café naïve Zürich Ångström 你好世界 こんにちは 안녕하세요 😀🎉🤖 " * 2,
    "e\u0301a\u0308o\u0302" * 5,  # combining marks, which NFC composes
    "\U0001f82a\u1f82\u0344" * 5,  # characters outside every test vocabulary
    "<s></s><pad>" * 3,
]


@pytest.mark.parametrize("kind", ["bytelevel", "sentencepiece"])
def test_bound_holds_for_real_tokenizer_kinds(kind: str) -> None:
    tokenizer = build_test_tokenizer(kind)
    bound = max_chars_per_token(tokenizer)
    assert bound is not None
    vocab = tokenizer.get_vocab()
    texts = [*TEXTS, max(vocab, key=len) * 10]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) >= math.ceil(len(text) / bound), text


def _fast(backend: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def _bpe(**kwargs: Any) -> Tokenizer:
    return Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2, "<unk>": 3}, merges=[], **kwargs))


def _with(backend: Tokenizer, **parts: Any) -> Tokenizer:
    for name, value in parts.items():
        setattr(backend, name, value)
    return backend


UNBOUNDED = {
    # A character BPE has no piece for is dropped: a run of them becomes no token at all.
    "bpe without unknown-token": _bpe(),
    "bpe fusing unknowns": _bpe(unk_token="<unk>", fuse_unk=True),
    "word level": id_tokenizer(16).backend_tokenizer,
    "wordpiece": Tokenizer(models.WordPiece({"a": 0, "[UNK]": 1}, unk_token="[UNK]")),
    "unigram": Tokenizer(models.Unigram([("a", -1.0), ("<unk>", -2.0)], unk_id=1)),
    "whitespace-dropping pre-tokenizer": _with(
        _bpe(unk_token="<unk>"), pre_tokenizer=pre_tokenizers.WhitespaceSplit()
    ),
    "stripping normalizer": _with(_bpe(unk_token="<unk>"), normalizer=normalizers.Strip()),
    "regex replace": _with(
        _bpe(unk_token="<unk>"), normalizer=normalizers.Replace(Regex(" +"), " ")
    ),
}


@pytest.mark.parametrize("case", list(UNBOUNDED))
def test_no_bound_where_a_token_may_cover_any_number_of_chars(case: str) -> None:
    assert max_chars_per_token(_fast(UNBOUNDED[case])) is None


def test_unknown_chars_drop_out_without_an_unknown_token() -> None:
    """Why the BPE case above has no bound: its token count does not grow with the text."""
    tokenizer = _fast(_bpe())
    assert tokenizer("ab" + "z" * 1000)["input_ids"] == [0, 1]


def test_bound_counts_unknown_tokens_and_composition() -> None:
    plain = _bpe(unk_token="<unk>")
    assert max_chars_per_token(_fast(plain)) == len("<unk>")
    composing = _with(_bpe(unk_token="<unk>"), normalizer=normalizers.NFC())
    assert max_chars_per_token(_fast(composing)) == len("<unk>") * MAX_CANONICAL_DECOMPOSITION


def test_max_canonical_decomposition_covers_unicode() -> None:
    longest = max(len(unicodedata.normalize("NFD", chr(c))) for c in range(sys.maxunicode + 1))
    assert longest <= MAX_CANONICAL_DECOMPOSITION


# ---- the flag ------------------------------------------------------------------------------------


def test_serve_passes_max_request_body_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    import parallm.server.app
    import parallm.server.launcher
    from parallm.cli import build_parser, main

    class FakeEngine:
        def summary(self) -> str:
            return "fake engine"

    built: dict[str, Any] = {}
    monkeypatch.setattr(parallm.server.launcher, "load_engine", lambda **kw: FakeEngine())
    monkeypatch.setattr(parallm.server.launcher, "run_server", lambda *a, **kw: None)
    monkeypatch.setattr(parallm.server.app, "build_app", lambda *a, **kw: built.update(kw))
    argv = ["serve", "--model", "/some/model", "--served-model-name", "m",
            "--disable-frontend-multiprocessing"]  # fmt: skip
    assert main([*argv, "--max-request-body-bytes", "1234"]) == 0
    assert built["max_request_body_bytes"] == 1234
    assert build_parser().parse_args(argv).max_request_body_bytes == 16 * 1024 * 1024


def test_serve_refuses_a_body_limit_below_one(capsys: pytest.CaptureFixture) -> None:
    from parallm.cli import main

    assert main(["serve", "--model", "/nonexistent", "--max-request-body-bytes", "0"]) == 2
    assert "--max-request-body-bytes must be >= 1, got 0" in capsys.readouterr().err
