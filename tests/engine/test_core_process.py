"""The engine-core process: serves through its client, stops cleanly, reports its start-up
error, and never outlives its client."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from process_checks import descendants, process_gone
from server_support import tiny_model_path
from slow_teardown import engine_with_slow_teardown

from parallm.engine.core.client import EngineCoreClient, EngineCoreError
from parallm.engine.core.messages import AddRequests, CoreOutputs, CoreRequest
from parallm.sampling_params import SamplingParams

ENGINE_KWARGS = dict(device="cpu", kv_cache_memory=4 << 20, max_model_len=256)


class Collector:
    """Gathers a client's outputs; ``wait_finished`` until a request has finished."""

    def __init__(self) -> None:
        self.outputs: list = []
        self.deaths: list[str] = []
        self.changed = threading.Condition()

    def on_outputs(self, batch: CoreOutputs) -> None:
        with self.changed:
            self.outputs += batch.outputs
            self.changed.notify_all()

    def on_death(self, reason: str) -> None:
        with self.changed:
            self.deaths.append(reason)
            self.changed.notify_all()

    def wait(self, predicate, timeout_s: float = 60.0) -> None:
        with self.changed:
            assert self.changed.wait_for(predicate, timeout_s)


def _add(client: EngineCoreClient, request_id: str, max_tokens: int) -> None:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
    client.send(
        AddRequests([CoreRequest(request_id, [5, 6, 7, 8], params, None, time.monotonic())])
    )


@pytest.fixture(scope="module")
def model() -> str:
    return str(tiny_model_path())


def test_client_generates_and_stops_cleanly(model: str) -> None:
    client = EngineCoreClient({"model": model, **ENGINE_KWARGS}, num_threads=1)
    folder = Path(client._dir)
    assert client.engine.max_model_len == 256 and client.engine.tokenizer is not None
    assert client.info.num_blocks > 0 and (folder / "commands").exists()
    got = Collector()
    client.start(got.on_outputs, got.on_death)
    _add(client, "r", max_tokens=5)
    got.wait(lambda: any(out.finished for out in got.outputs))
    assert sum(len(out.outputs[0].token_ids) for out in got.outputs) == 5
    pid = client.pid
    client.stop()
    assert client.process.exitcode == 0 and process_gone(pid)
    assert not folder.exists() and got.deaths == [] and client.failure is None


def test_a_killed_core_is_reported_once_with_its_exit_code(model: str) -> None:
    client = EngineCoreClient({"model": model, **ENGINE_KWARGS}, num_threads=1)
    got = Collector()
    client.start(got.on_outputs, got.on_death)
    _add(client, "long", max_tokens=200)
    got.wait(lambda: len(got.outputs) >= 2)
    os.kill(client.pid, signal.SIGKILL)
    got.wait(lambda: got.deaths)
    (reason,) = got.deaths
    assert f"engine core process (pid {client.pid}) died unexpectedly with exit code -9" in reason
    assert not client.is_alive() and client.failure == reason
    client.stop()  # still releases the sockets and the folder
    assert not Path(client._dir).exists()
    _add(client, "after", max_tokens=1)  # a send after the death is dropped, not an error


def test_a_bad_argument_raises_the_cores_value_error(model: str) -> None:
    with pytest.raises(ValueError, match=r"unknown engine argument\(s\) \['bogus_option'\]"):
        EngineCoreClient({"model": model, "bogus_option": 1, **ENGINE_KWARGS})


def test_a_failed_start_up_carries_the_cores_error_and_leaves_nothing(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    before = set(Path(os.environ.get("TMPDIR", "/tmp")).glob("parallm-core-*"))
    spawned_before = _spawned_children()
    with pytest.raises(EngineCoreError, match="the engine core failed to start: JSONDecodeError"):
        EngineCoreClient({"model": str(broken), **ENGINE_KWARGS})
    after = set(Path(os.environ.get("TMPDIR", "/tmp")).glob("parallm-core-*"))
    assert after <= before  # its socket folder is gone
    assert _spawned_children() <= spawned_before  # no core process is left


_ORPHAN_SCRIPT = """
import sys, time
from parallm.engine.core.client import EngineCoreClient
client = EngineCoreClient({"model": sys.argv[1], "device": "cpu", "kv_cache_memory": 4 << 20,
                           "max_model_len": 256}, num_threads=1)
print(client.pid, client._dir, flush=True)
time.sleep(600)
"""


@contextmanager
def _client_process(*args: str) -> Iterator[tuple[subprocess.Popen, int, str]]:
    """Runs a client script (``python *args``) that prints its core's pid and socket folder;
    yields the client's process, the core's pid and the folder. At the end the client is
    killed, and so is the core if it is still there (the test failed: leave nothing behind)."""
    proc = subprocess.Popen(
        [sys.executable, *args], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    core_pid = None
    try:
        pid_text, folder = proc.stdout.readline().split()
        core_pid = int(pid_text)
        yield proc, core_pid, folder
    finally:
        proc.kill()
        proc.wait()
        if core_pid is not None and not process_gone(core_pid, timeout_s=0):
            os.kill(core_pid, signal.SIGKILL)
            shutil.rmtree(folder, ignore_errors=True)


def _wait_until(predicate: Callable[[], bool], timeout_s: float) -> bool:
    """Whether ``predicate`` holds within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()


def test_the_core_exits_when_its_client_process_dies(model: str) -> None:
    with _client_process("-c", _ORPHAN_SCRIPT, model) as (proc, core_pid, folder):
        assert not process_gone(core_pid, timeout_s=0.5)
        proc.kill()  # SIGKILL: no clean-up runs in the client
        proc.wait()
        assert process_gone(core_pid)
        # The core removed the sockets' folder.
        assert _wait_until(lambda: not Path(folder).exists(), timeout_s=10)


_LOADING_SCRIPT = """
import sys, time
from parallm.engine.core import client

def report_and_wait(self):  # the client's process dies while its core is still loading
    print(self.process.pid, self._dir, flush=True)
    time.sleep(600)

client.EngineCoreClient._wait_ready = report_and_wait
if __name__ == "__main__":
    client.EngineCoreClient({"model": sys.argv[1], "device": "cpu"}, num_threads=1)
"""


def test_the_core_stops_loading_when_its_client_process_dies(tmp_path: Path) -> None:
    """A load that never ends (its config.json is a FIFO nobody writes) is interrupted."""
    model = tmp_path / "model"
    model.mkdir()
    os.mkfifo(model / "config.json")
    script = tmp_path / "client.py"
    script.write_text(_LOADING_SCRIPT)
    with _client_process(str(script), str(model)) as (proc, core_pid, folder):
        assert _wait_until(lambda: _blocked_opening_a_fifo(core_pid), timeout_s=60)  # loading
        proc.kill()
        proc.wait()
        assert process_gone(core_pid)
        assert not Path(folder).exists()


def _blocked_opening_a_fifo(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/wchan").read_text() == "wait_for_partner"
    except FileNotFoundError:
        return False


def _spawned_children() -> set[int]:
    return {p for p in descendants(os.getpid()) if "spawn_main" in _cmdline(p)}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except FileNotFoundError:
        return ""


def test_a_stopped_core_exits_once_its_cleanup_is_done(model: str, caplog) -> None:
    """After Shutdown the core closes its engine and sockets and exits with 0 at once; the
    interpreter's teardown of what the engine left in the process is not waited for (the
    client would kill the core after its timeout, with a warning)."""
    client = EngineCoreClient(
        {"model": model, **ENGINE_KWARGS}, num_threads=1, engine_factory=engine_with_slow_teardown
    )
    got = Collector()
    client.start(got.on_outputs, got.on_death)
    _add(client, "r", max_tokens=3)
    got.wait(lambda: any(out.finished for out in got.outputs))
    folder = Path(client._dir)
    with caplog.at_level("WARNING", logger="parallm.engine.core"):
        client.stop()
    assert client.process.exitcode == 0  # not killed (-9)
    assert "did not stop" not in caplog.text
    assert not folder.exists() and got.deaths == [] and client.failure is None
