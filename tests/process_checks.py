"""Process checks shared by the multi-process engine tests. (No tests here.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from server_support import process_gone


def assert_children_exit_when_killed(script: str, folder: Path, *args: str, count: int) -> None:
    """Run ``script`` with ``args``: it prints the pids of the children it started on one line,
    then waits. SIGKILL it once it has (no clean-up runs in it) and assert that it printed
    ``count`` pids and that each of those processes exits within a minute, a liveness bound:
    each child notices that its pipe to the killed parent closed."""
    path = folder / "parent.py"
    path.write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen([sys.executable, str(path), *args], stdout=subprocess.PIPE,
                              text=True, env=env)  # fmt: skip
    try:
        pids = [int(pid) for pid in parent.stdout.readline().split()]
    finally:
        parent.kill()
        parent.wait()
    assert len(pids) == count, pids
    assert all(process_gone(pid, timeout_s=60) for pid in pids), pids
