"""The server with its engine core in its own process: the core's death fails every request
with a clear error, marks the server unhealthy and stops it (``parallm serve`` exits 1);
Ctrl-C stops the server, the core and its workers; a core that cannot start says why."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from process_checks import descendants, process_gone
from serve_process import CONTEXT, HEADERS, StreamReader, core_pids, serve_command, serve_processes
from server_support import (
    MODEL_NAME,
    client,
    running_server,
    tiny_model_path,
    wait_until_idle,
)

from parallm.server.launcher import engine_failure

# Thousands of engine steps: the stream is still running when the core is killed.
LONG = {"model": MODEL_NAME, "prompt": "def f():", "max_tokens": CONTEXT - 16, "ignore_eos": True}


def _reader(url: str) -> StreamReader:
    """A reader of one long completion stream."""
    return StreamReader(url, LONG, timeout_s=60)


def test_killing_the_core_mid_stream_fails_requests_and_stops_the_server() -> None:
    with running_server(max_model_len=CONTEXT) as server:
        async_engine = server.app.state.ctx.engine
        core_pid = async_engine.core.pid
        reader = _reader(server.url)
        reader.start()
        assert reader.started.wait(60)
        assert httpx.get(server.url + "/health").status_code == 200
        os.kill(core_pid, signal.SIGKILL)
        reader.join(60)
        assert not reader.is_alive()
        *_, error_event, done = reader.events
        assert done == "[DONE]"
        error = json.loads(error_event)["error"]
        expected = f"engine core process (pid {core_pid}) died unexpectedly with exit code -9"
        assert expected in error["message"] and error["code"] == "503"
        assert not async_engine.is_healthy and expected in engine_failure(server.app)
        server._thread.join(30)  # the server stops itself
        assert not server._thread.is_alive()
        assert process_gone(core_pid, timeout_s=0)


def test_requests_leave_nothing_behind_in_the_api_process() -> None:
    """Finished, failed and abandoned requests leave no bookkeeping (streams, detokenizers)."""
    with running_server(max_model_len=CONTEXT) as server:
        async_engine = server.app.state.ctx.engine
        api = client(server)
        api.completions.create(model=MODEL_NAME, prompt="x = 1", max_tokens=8, n=2, logprobs=2)
        for chunk in api.completions.create(model=MODEL_NAME, prompt="y", max_tokens=8,
                                            stream=True):  # fmt: skip
            assert chunk.choices
        stream = api.completions.create(model=MODEL_NAME, prompt="z", max_tokens=CONTEXT - 16,
                                        stream=True, extra_body={"ignore_eos": True})  # fmt: skip
        next(iter(stream))
        stream.close()  # the client goes away mid-stream
        bad = httpx.post(server.url + "/v1/completions", headers=HEADERS,
                         json={**LONG, "prompt": [10**6]})  # fmt: skip
        assert bad.status_code == 400
        wait_until_idle(server)
        assert async_engine._tracked == {} and len(async_engine._detokenizer) == 0


@pytest.fixture
def serve_process() -> Iterator:
    """Starts ``parallm serve`` with the given flags; kills whatever is left at the end."""
    with serve_processes() as start:
        yield lambda *flags: start("--drain-timeout", "1", "--model", str(tiny_model_path()),
                                   *flags)  # fmt: skip


def test_serve_exits_1_when_its_core_dies_and_leaves_no_process(serve_process) -> None:
    proc, url, stderr = serve_process("--tensor-parallel-size", "2")
    processes = descendants(proc.pid)  # the core, its worker, multiprocessing's tracker
    (core_pid,) = core_pids(proc.pid)
    assert len(processes) >= 3 and core_pid in processes
    reader = _reader(url)
    reader.start()
    assert reader.started.wait(60)
    os.kill(core_pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == 1
    reader.join(30)
    assert "engine core process" in reader.events[-2] and reader.events[-1] == "[DONE]"
    assert all(process_gone(pid) for pid in processes)
    message = f"engine core process (pid {core_pid}) died unexpectedly with exit code -9"
    assert f"parallm serve: error: the {message}" in "".join(stderr)


def test_ctrl_c_stops_the_server_the_core_and_its_worker(serve_process) -> None:
    proc, url, stderr = serve_process("--tensor-parallel-size", "2")
    processes = descendants(proc.pid)
    r = httpx.post(url + "/v1/completions", json={**LONG, "max_tokens": 4}, headers=HEADERS,
                   timeout=60)  # fmt: skip
    assert r.status_code == 200
    os.killpg(proc.pid, signal.SIGINT)  # the whole group, as a terminal's Ctrl-C does
    assert proc.wait(timeout=60) == 130  # 128 + SIGINT, the shell's convention for Ctrl-C
    assert all(process_gone(pid) for pid in processes)
    assert "Traceback" not in "".join(stderr)


def test_serve_reports_the_cores_start_up_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    proc = serve_command("--model", str(broken))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "parallm serve: error: the engine core failed to start: JSONDecodeError" in err
