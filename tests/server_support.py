"""Helpers for the server tests: a tiny model built once per process, a server on a free
loopback port, and a /metrics reader. (No tests here.)"""

from __future__ import annotations

import atexit
import functools
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import torch

from parallm.server.app import build_app
from parallm.server.launcher import ServerThread, load_engine, start_engine_core
from parallm.server.limits import DEFAULT_MAX_REQUEST_BODY_BYTES

API_KEY = "test-key"
MODEL_NAME = "tiny"
MAX_MODEL_LEN = 256


@functools.cache
def tiny_model_path() -> Path:
    """A random 2-layer Llama with a 512-token BPE vocabulary (about 6 s to build, once)."""
    from parallm.commands.tiny_model import make_tiny_model

    root = Path(tempfile.mkdtemp(prefix="parallm-server-test-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    make_tiny_model(root / "model", hidden_size=64, num_layers=2, vocab_size=512, seed=0)
    return root / "model"


@contextmanager
def running_server(
    api_key: str | None = API_KEY,
    max_num_waiting: int = 64,
    drain_timeout_s: float = 2.0,
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES,
    multiprocess: bool = True,
    **engine_kwargs: Any,
) -> Iterator[ServerThread]:
    """The real app under uvicorn on 127.0.0.1:<free port>, stopped (gracefully) at exit.

    ``multiprocess`` runs the engine core in its own process, as ``parallm serve`` does; tests
    that look inside the engine (or patch it) pass False to run it on a thread here.
    """
    # One intra-op thread: the model is tiny and the machine's cores are shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    kwargs = dict(device="cpu", kv_cache_memory=4 << 20, max_model_len=MAX_MODEL_LEN)
    kwargs.update(engine_kwargs)
    model = str(tiny_model_path())
    if multiprocess:
        engine = start_engine_core(num_threads=1, model=model, **kwargs)
    else:
        engine = load_engine(model=model, **kwargs)
    app = build_app(
        engine, MODEL_NAME, api_key=api_key, max_num_waiting=max_num_waiting,
        max_request_body_bytes=max_request_body_bytes,
    )  # fmt: skip
    try:
        with ServerThread(app, drain_timeout_s=drain_timeout_s) as server:
            yield server
    finally:
        torch.set_num_threads(threads)
        if multiprocess:  # the app's shutdown stopped it, unless the app never started
            engine.stop()


def client(server: ServerThread, **kwargs: Any) -> openai.OpenAI:
    """The official client, without retries (a retried 429/500 would hide what we test)."""
    kwargs = {"api_key": API_KEY, "max_retries": 0, "timeout": 60, **kwargs}
    return openai.OpenAI(base_url=server.url + "/v1", **kwargs)


def async_client(server: ServerThread) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


def post(server: ServerThread, path: str, body: Any, key: str | None = API_KEY) -> httpx.Response:
    """A raw POST (for bodies the SDK would refuse to send)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, str | bytes) else None
    json_body = None if content is not None else body
    return httpx.post(
        server.url + path, content=content, json=json_body, headers=headers, timeout=60
    )


def metrics(server: ServerThread) -> dict[str, float]:
    """``/metrics`` as {name without labels: value} (first sample of each name)."""
    values: dict[str, float] = {}
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        match = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})? (\S+)$", line)
        if match and match.group(1) not in values:
            values[match.group(1)] = float(match.group(3))
    return values


def wait_until_idle(server: ServerThread, timeout_s: float = 10.0) -> dict[str, float]:
    """Poll /metrics until no request runs or waits and no KV block is held; the metrics."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = metrics(server)
        idle = (
            m["parallm:kv_cache_blocks_in_use"] == 0
            and m["parallm:num_requests_running"] == 0
            and m["parallm:num_requests_waiting"] == 0
        )
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.02)


def assert_serves(server: ServerThread) -> None:
    """The server still answers a normal request correctly."""
    out = client(server).completions.create(
        model=MODEL_NAME,
        prompt="def main():",
        max_tokens=4,
        seed=0,
        extra_body={"ignore_eos": True},
    )
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 4
