"""benchmarks/spec_step_profile.py on CPU: the phase timers add up within a step, count each
nested phase once, leave the engine's methods as they were, and a drafted step reports its
proposal and verification."""

from __future__ import annotations

from collections import defaultdict

import pytest
from benchmark_module import load_benchmark

from parallm.bundled import BUNDLED_MODEL_DIR
from parallm.engine.engine import LLMEngine
from parallm.engine.runner import ModelRunner

pytestmark = pytest.mark.skipif(
    not (BUNDLED_MODEL_DIR / "config.json").exists(), reason="no bundled model"
)


def _load_bench():
    return load_benchmark("spec_step_profile")


def test_a_phase_nested_in_itself_counts_once():
    bench = _load_bench()

    class Work:
        def outer(self, n):
            return self.outer(n - 1) if n else "done"

    totals, counts = defaultdict(float), defaultdict(int)
    with bench.phase_timers(totals, counts, [("outer", Work, "outer")]):
        assert Work().outer(3) == "done"
    assert counts == {"outer": 1} and totals["outer"] > 0
    assert Work.outer.__name__ == "outer"  # restored


def test_profile_of_plain_and_ngram_steps(tmp_path):
    bench = _load_bench()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    body = "import os\n\n\nclass Walker:\n    def __init__(self, root):\n"
    for i in range(3):
        lines = [f"# module {i}", '"""Docs."""', "", body, "        self.root = root", ""]
        lines += ["    def files(self):", "        return os.listdir(self.root)", ""]
        (corpus / f"m{i}.py").write_text("\n".join(lines) * 2)
    step, hidden = LLMEngine.step, ModelRunner._hidden
    args = bench.parse_args(["--device", "cpu", "--dtype", "float32", "--corpus", str(corpus),
                             "--val-fraction", "1", "--num-prompts", "2", "--max-tokens", "12",
                             "--methods", "ngram"])  # fmt: skip
    rows = bench.run(args)
    assert LLMEngine.step is step and ModelRunner._hidden is hidden
    assert set(rows) == {"plain", "ngram"}
    for row in rows.values():
        us, calls = row["us_per_step"], row["calls_per_step"]
        assert calls["step"] == 1 and calls["launch"] == 1 and calls["wait"] == 1
        parts = sum(us.get(label, 0.0) for label in bench.TOP_LEVEL)
        assert 0 < parts <= us["step"] and us["other"] >= 0
        assert us["eager"] <= us["launch"]  # on CPU every forward is eager, inside launch
        assert row["identical_outputs"] == 1.0  # float32
    assert "propose" not in rows["plain"]["calls_per_step"]
    assert rows["ngram"]["calls_per_step"]["propose"] == 1
    assert rows["ngram"]["tokens_per_step"] >= 1


def test_unknown_method_is_named():
    bench = _load_bench()
    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "ngram,eagle"])
