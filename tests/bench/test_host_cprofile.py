"""benchmarks/host_cprofile.py on CPU: both passes are profiled and reported, each with the
engine's own functions listed, and only the speculative pass calls the drafter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from parallm.bundled import BUNDLED_MODEL_DIR

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not (BUNDLED_MODEL_DIR / "config.json").exists(), reason="no bundled model"
)


def test_reports_plain_and_ngram_passes(tmp_path):
    out = tmp_path / "profile.txt"
    cmd = [sys.executable, str(REPO / "benchmarks/host_cprofile.py"), "--device", "cpu",
           "--dtype", "float32", "--corpus", "stdlib", "--val-fraction", "0.02",
           "--num-prompts", "2", "--max-tokens", "8", "--top", "1000", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = out.read_text()
    plain, ngram = report.split("===== ngram =====")
    for section in (plain, ngram):
        assert "tokens in" in section and "Ordered by: internal time" in section
        assert "Ordered by: cumulative time" in section
        assert "parallm/engine/engine.py" in section  # the engine's steps were profiled
    assert plain.startswith("===== plain =====")
    assert "spec/drafting.py" in ngram and "spec/drafting.py" not in plain
