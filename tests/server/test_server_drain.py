"""SIGTERM with streams that outlast ``--drain-timeout``: each ends normally, the process exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
from server_support import API_KEY, MODEL_NAME, tiny_model_path

CONTEXT = 2048
# Thousands of engine steps: far longer than the drain timeout, so every stream is cut by it.
MAX_TOKENS = CONTEXT - 16
DRAIN_TIMEOUT_S = 0.5
NUM_STREAMS = 6  # and one request that waits for its whole answer


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    stderr: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    def wait_for_exit(self, timeout_s: float) -> tuple[int, str]:
        code = self.proc.wait(timeout=timeout_s)
        if self._reader is not None:
            self._reader.join(timeout_s)
        return code, "".join(self.stderr)


def _start_server() -> Server:
    cmd = [
        sys.executable, "-m", "parallm", "serve", "--model", str(tiny_model_path()),
        "--port", "0", "--device", "cpu", "--kv-cache-memory", str(4 << 20),
        "--max-model-len", str(CONTEXT), "--served-model-name", MODEL_NAME,
        "--api-key", API_KEY, "--drain-timeout", str(DRAIN_TIMEOUT_S),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    server = Server(proc, "")
    for line in proc.stderr:
        server.stderr.append(line)
        if "serving on " in line:
            server.url = line.split("serving on ", 1)[1].strip().removesuffix("/v1")
            server._reader = threading.Thread(
                target=lambda: server.stderr.extend(proc.stderr), daemon=True
            )
            server._reader.start()
            return server
    raise AssertionError(f"the server did not start: {''.join(server.stderr)}")


def _body(i: int) -> tuple[str, dict]:
    """A long streaming request: chat and completions alternate, one with two choices."""
    common = {"model": MODEL_NAME, "stream": True, "max_tokens": MAX_TOKENS, "ignore_eos": True}
    if i == 0:
        return "/v1/completions", {**common, "prompt": "def f():", "n": 2}
    if i % 2:
        messages = [{"role": "user", "content": f"Write function {i}."}]
        return "/v1/chat/completions", {**common, "messages": messages}
    return "/v1/completions", {**common, "prompt": f"def g{i}():"}


def _read_stream(url: str, i: int, started: threading.Barrier) -> list[str]:
    """Every ``data:`` payload of one stream, until the server closes it."""
    path, body = _body(i)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    events: list[str] = []
    with httpx.stream("POST", url + path, json=body, headers=headers, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                if len(events) == 2:
                    started.wait()  # every stream is generating before SIGTERM
    return events


def _complete_whole(url: str) -> httpx.Response:
    """A long non-streaming request."""
    body = {"model": MODEL_NAME, "prompt": "def h():", "max_tokens": MAX_TOKENS, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    return httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=60)


def _wait_until_running(url: str, num_requests: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in httpx.get(url + "/metrics").text.splitlines():
            running = line.startswith("parallm:num_requests_running{")
            if running and float(line.split()[-1]) >= num_requests:
                return
        time.sleep(0.02)
    raise AssertionError(f"{num_requests} requests never ran at once")


def _finish_reasons(events: list[str]) -> dict[int, str]:
    reasons = {}
    for event in events[:-1]:
        for choice in json.loads(event)["choices"]:
            if choice.get("finish_reason") is not None:
                reasons[choice["index"]] = choice["finish_reason"]
    return reasons


def test_sigterm_past_the_drain_timeout_ends_every_stream_with_abort_and_done() -> None:
    server = _start_server()
    try:
        started = threading.Barrier(NUM_STREAMS + 1, timeout=60)
        with ThreadPoolExecutor(NUM_STREAMS + 1) as pool:
            streams = [
                pool.submit(_read_stream, server.url, i, started) for i in range(NUM_STREAMS)
            ]
            whole = pool.submit(_complete_whole, server.url)
            started.wait()
            _wait_until_running(server.url, NUM_STREAMS + 1)
            server.proc.send_signal(signal.SIGTERM)
            results = [s.result(timeout=60) for s in streams]  # raises on a cut connection
            answer = whole.result(timeout=60)
        code, stderr = server.wait_for_exit(timeout_s=30)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
    for i, events in enumerate(results):
        assert events[-1] == "[DONE]", f"stream {i} ended without [DONE]: {events[-2:]}"
        num_choices = 2 if i == 0 else 1
        assert _finish_reasons(events) == dict.fromkeys(range(num_choices), "abort"), i
    # A client waiting for a whole answer gets what was generated, ended by "abort".
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["finish_reason"] == "abort"
    assert code == 0
    assert "Traceback" not in stderr and "ASGI" not in stderr, stderr
