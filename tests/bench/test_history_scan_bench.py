"""benchmarks/history_scan_bench.py: its looped scan variant gives the package kernel's drafts
(the check the benchmark runs before timing), under the Triton interpreter on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks/history_scan_bench.py"


def test_the_variant_matches_the_package_kernel_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, str(BENCH), "--check-only", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert proc.stdout.count(": same drafts;") == 4
