"""benchmarks/api_server_bench.py on CPU: the real server and engine-core process around the
fake engine serve every stream to its end with the right token counts, and the profile names
the API process's threads and the core."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_api_server_bench_serves_the_fake_engine_and_profiles(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    cmd = [sys.executable, str(REPO / "benchmarks/api_server_bench.py"), "--concurrency", "4",
           "--prompt-len", "16", "--output-len", "12", "--duration-s", "2", "--step-ms", "2",
           "--profile", "--profile-top", "40", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failed"] == 0 and report["completed"] >= 4
    # Every stream carried all of its tokens (usage), and counted its 16-token prompt.
    assert report["output_tok_s"] * 2 == report["completed"] * 12
    assert report["total_tok_s"] * 2 == report["completed"] * (12 + 16)
    assert 1 <= report["tokens_per_chunk"] <= 12
    assert set(report["profile"]) == {"api_event_loop", "api_delivery_thread", "core"}
    assert "api_server_bench.py" in report["profile"]["core"]  # the fake engine's step ran there
