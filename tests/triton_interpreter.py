"""Shared set-up of the Triton kernel tests: the interpreter on CPU, a subprocess fallback.

Import this before triton. Without CUDA it switches the Triton interpreter on, which only
works if nothing imported triton earlier in the process; when something did (or CUDA is
present, where a global TRITON_INTERPRET would slow the GPU tests down), a test module runs
its interpreter tests in a fresh subprocess instead.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def run_interpreter_suite(test_file: str) -> tuple[str, str]:
    """Run ``test_file``'s CPU tests under TRITON_INTERPRET=1; returns (stdout, tail of both).

    Fails the calling test when that run fails.
    """
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs"]
    cmd += ["-m", "not gpu", "-k", "not in_subprocess", os.path.abspath(test_file)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, output
    return proc.stdout, output
