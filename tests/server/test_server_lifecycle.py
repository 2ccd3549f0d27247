"""Clients that leave get their requests aborted and their KV blocks back; SIGTERM drains."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from server_support import (
    API_KEY,
    MODEL_NAME,
    assert_serves,
    client,
    metrics,
    running_server,
    tiny_model_path,
    wait_until_idle,
)

from parallm.server.launcher import ServerThread

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
# Long enough (thousands of engine steps, seconds) that a request still runs when we act on it.
CONTEXT = 2048
LONG = {"prompt": "a", "max_tokens": CONTEXT - 8, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with running_server(max_model_len=CONTEXT) as s:
        yield s


def _tokens_generated(before: dict[str, float], after: dict[str, float]) -> float:
    name = "parallm:generation_tokens_total"
    return after[name] - before[name]


def _aborted(before: dict[str, float], after: dict[str, float]) -> float:
    name = "parallm:request_aborted_total"
    return after[name] - before[name]


def test_cancelled_stream_is_aborted_and_frees_its_blocks(server: ServerThread) -> None:
    before = metrics(server)
    stream = client(server).completions.create(model=MODEL_NAME, stream=True, **LONG)
    chunks = iter(stream)
    next(chunks), next(chunks)
    assert metrics(server)["parallm:kv_cache_blocks_in_use"] > 0
    stream.close()
    after = wait_until_idle(server)
    assert after["parallm:kv_cache_blocks_in_use"] == 0
    assert _aborted(before, after) == 1
    assert _tokens_generated(before, after) < LONG["max_tokens"]
    assert_serves(server)


def test_disconnect_while_waiting_for_a_whole_answer_aborts(server: ServerThread) -> None:
    before = metrics(server)
    body = {"model": MODEL_NAME, "prompt": "a", "max_tokens": LONG["max_tokens"],
            "ignore_eos": True}  # fmt: skip
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.3,
                   headers={"Authorization": f"Bearer {API_KEY}"})  # fmt: skip
    after = wait_until_idle(server)
    assert after["parallm:kv_cache_blocks_in_use"] == 0
    assert _aborted(before, after) == 1
    assert _tokens_generated(before, after) < LONG["max_tokens"]
    assert_serves(server)


def test_shutdown_past_the_drain_timeout_aborts_what_is_left() -> None:
    with running_server(drain_timeout_s=0.3, max_model_len=CONTEXT, multiprocess=False) as server:
        engine = server.app.state.ctx.engine
        stream = client(server).completions.create(model=MODEL_NAME, stream=True, **LONG)
        chunks = iter(stream)
        next(chunks)
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        rest = list(chunks)  # the stream ends normally: a last chunk, then [DONE]
        stopper.join(10)
        assert not stopper.is_alive()
        assert rest[-1].choices[0].finish_reason == "abort"
        assert len(rest) < LONG["max_tokens"]
        assert not engine.is_healthy
        assert not engine.engine.has_unfinished_requests()
        assert engine.engine.kv.num_free_blocks == engine.engine.kv.num_blocks


def _start_cli_server(drain_timeout_s: float) -> tuple[subprocess.Popen, str]:
    cmd = [
        sys.executable, "-m", "parallm", "serve", "--model", str(tiny_model_path()),
        "--port", "0", "--device", "cpu", "--kv-cache-memory", str(4 << 20),
        "--max-model-len", str(CONTEXT), "--served-model-name", MODEL_NAME,
        "--api-key", API_KEY, "--drain-timeout", str(drain_timeout_s), "--log-level", "warning",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stderr:
        if "serving on " in line:
            url = line.split("serving on ", 1)[1].strip().removesuffix("/v1")
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe open
            return proc, url
    raise AssertionError(f"the server did not start (exit code {proc.wait()})")


def test_sigterm_drains_running_requests_then_exits() -> None:
    proc, url = _start_cli_server(drain_timeout_s=30)
    try:
        server = type("Url", (), {"url": url})()
        # A few hundred tokens: still running when SIGTERM arrives, and drained in seconds.
        request = {**LONG, "max_tokens": 400}
        stream = client(server).completions.create(model=MODEL_NAME, stream=True, **request)
        chunks = iter(stream)
        first = next(chunks)
        proc.send_signal(signal.SIGTERM)
        rest = list(chunks)
        text = first.choices[0].text + "".join(c.choices[0].text for c in rest)
        assert rest[-1].choices[0].finish_reason == "length", "the running request finished"
        assert text
        assert proc.wait(timeout=30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_load_test_script_passes_briefly(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("load_test", SCRIPTS / "load_test.py")
    load_test = importlib.util.module_from_spec(spec)
    sys.modules["load_test"] = load_test  # dataclasses look their module up there
    spec.loader.exec_module(load_test)
    with running_server(max_num_waiting=64) as server:
        argv = ["--url", server.url, "--api-key", API_KEY, "--clients", "20", "--duration",
                "2", "--max-tokens", "8"]  # fmt: skip
        assert load_test.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["errors"] == {} and report["kv_blocks_held_after"] == 0
    assert report["requests_completed"] > 0 and report["requests_disconnected"] > 0
    with pytest.raises(SystemExit):  # loopback only
        load_test.parse_args(["--url", "http://example.com:8000"])
