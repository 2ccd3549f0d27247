"""benchmarks/spec_oracle_bench.py on CPU with a tiny dummy model: the oracle drafter's drafts
are accepted (all of them when none is made wrong), and the output stays plain decoding's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_oracle_bench_reports_tokens_per_step(tiny_model_dir, tmp_path):
    out = tmp_path / "oracle.json"
    cmd = [sys.executable, str(REPO / "benchmarks/spec_oracle_bench.py"),
           "--config", str(tiny_model_dir("llama3") / "config.json"), "--device", "cpu",
           "--batch-sizes", "2", "--k", "2,4", "--wrong", "0,0.6", "--input-len", "8",
           "--output-len", "20", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {(r["k"], r["wrong"]): r for r in json.loads(out.read_text())}
    assert set(rows) == {(2, 0.0), (2, 0.6), (4, 0.0), (4, 0.6)}
    assert all(r["identical_outputs"] == 1.0 for r in rows.values())  # float32: plain decoding's
    for k in (2, 4):
        right, wrong = rows[(k, 0.0)]["tokens_per_step"], rows[(k, 0.6)]["tokens_per_step"]
        assert k / 2 < right <= k + 1  # every draft right: close to k + 1 a step
        assert 1 <= wrong < right
    assert rows[(4, 0.0)]["tokens_per_step"] > rows[(2, 0.0)]["tokens_per_step"]
