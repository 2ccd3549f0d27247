"""Helpers for the tests of ``parallm serve`` as a process: start it (CPU, a free port, the
server tests' model name and API key), wait for its URL, stream a completion from it, find
its engine cores, and kill whatever is left of it. (No tests here.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from process_checks import descendants, process_gone
from server_support import API_KEY, MODEL_NAME

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
CONTEXT = 2048


def serve_command(*flags: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``parallm serve`` on the CPU with a 4 MiB KV cache and ``CONTEXT`` tokens, then
    ``flags``; stderr piped, ``env`` added to the environment. A session of its own: a signal
    to its process group is what a terminal's Ctrl-C sends."""
    cmd = [
        sys.executable, "-m", "parallm", "serve", "--port", "0", "--device", "cpu",
        "--kv-cache-memory", str(4 << 20), "--max-model-len", str(CONTEXT),
        "--served-model-name", MODEL_NAME, "--api-key", API_KEY, *flags,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # fmt: skip


def url_once_serving(proc: subprocess.Popen, stderr: list[str]) -> str:
    """The server's base URL once it logs that it serves; its stderr lines go to ``stderr``
    (the rest of them from a thread). AssertionError when it exits first."""
    for line in proc.stderr:
        stderr.append(line)
        if "serving on " in line:
            threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True).start()
            return line.split("serving on ", 1)[1].strip().removesuffix("/v1")
    raise AssertionError(f"the server did not start: {''.join(stderr)}")


@contextmanager
def serve_processes(env: dict[str, str] | None = None) -> Iterator:
    """Yields ``start(*flags) -> (process, url, stderr lines)``, which runs ``serve_command``
    until it serves; at the end kills whatever is left of every server started (its process
    and the descendants it had once serving)."""
    started: list[tuple[subprocess.Popen, list[int]]] = []

    def start(*flags: str) -> tuple[subprocess.Popen, str, list[str]]:
        proc = serve_command(*flags, env=env)
        stderr: list[str] = []
        url = url_once_serving(proc, stderr)
        started.append((proc, descendants(proc.pid)))
        return proc, url, stderr

    try:
        yield start
    finally:
        for proc, children in started:
            for pid in [proc.pid, *children]:
                if not process_gone(pid, timeout_s=0):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()


def spawned(pids: Iterable[int]) -> list[int]:
    """The processes of ``pids`` that multiprocessing spawned (engine cores, TP workers)."""
    return [p for p in pids if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]


def core_pids(serve_pid: int) -> list[int]:
    """The engine-core processes: the spawned children of the server (their own
    tensor-parallel workers are their children), ascending."""
    children = Path(f"/proc/{serve_pid}/task/{serve_pid}/children").read_text().split()
    return sorted(spawned(int(p) for p in children))


class StreamReader(threading.Thread):
    """Reads one completion stream of ``body``; ``started`` is set once two events came."""

    def __init__(self, url: str, body: dict[str, Any], timeout_s: float = 120) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.body = {**body, "stream": True}
        self.timeout_s = timeout_s
        self.events: list[str] = []
        self.started = threading.Event()

    def run(self) -> None:
        with httpx.stream("POST", self.url + "/v1/completions", json=self.body, headers=HEADERS,
                          timeout=self.timeout_s) as response:  # fmt: skip
            for line in response.iter_lines():
                if line.startswith("data: "):
                    self.events.append(line.removeprefix("data: "))
                    if len(self.events) == 2:
                        self.started.set()
        self.started.set()

    def finish_reason(self) -> str | None:
        """The finish reason of the stream's last choice chunk."""
        reasons = [json.loads(e)["choices"][0].get("finish_reason") for e in self.events
                   if e != "[DONE]" and json.loads(e).get("choices")]  # fmt: skip
        return reasons[-1] if reasons else None
