"""Process checks shared by the multi-process engine tests. (No tests here.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from server_support import process_gone

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
