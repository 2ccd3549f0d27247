"""Process checks shared by the multi-process engine tests. (No tests here.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# Starts an LLM, prints the pids of its children whose names start with argv[3], then waits.
_PARENT = """
import json, multiprocessing, sys, time
from parallm import LLM
if __name__ == "__main__":
    llm = LLM(sys.argv[1], **json.loads(sys.argv[2]))
    children = multiprocessing.active_children()
    print(*[p.pid for p in children if p.name.startswith(sys.argv[3])], flush=True)
    time.sleep(600)
"""


def assert_children_exit_when_killed(
    folder: Path, model: str, prefix: str, count: int, **llm_kwargs: Any
) -> None:
    """Start ``LLM(model, **llm_kwargs)`` in a process of its own and SIGKILL it (no clean-up
    runs in it) once it is up; assert that it had ``count`` children whose names start with
    ``prefix``, and that each exits within a minute, a liveness bound: each notices that its
    pipe to the killed parent closed."""
    path = folder / "parent.py"
    path.write_text(_PARENT)
    args = [sys.executable, str(path), model, json.dumps(llm_kwargs), prefix]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env)
    try:
        pids = [int(pid) for pid in parent.stdout.readline().split()]
    finally:
        parent.kill()
        parent.wait()
    assert len(pids) == count, pids
    assert all(process_gone(pid, timeout_s=60) for pid in pids), pids


def process_gone(pid: int, timeout_s: float = 30.0) -> bool:
    """Whether ``pid`` exits within ``timeout_s`` (a zombie nobody reaped counts as exited)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def descendants(pid: int) -> list[int]:
    """The live processes below ``pid`` (children of any of its threads, recursively)."""
    found: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            pids = [int(p) for p in children.read_text().split()]
        except FileNotFoundError:
            continue
        for child in pids:
            found += [child, *descendants(child)]
    return found
