"""benchmarks/spec_real_bench.py on CPU: the bundled model drafts for itself (every greedy draft
is the target's own token, so a drafted step emits close to k + 1 tokens), prompts are cut
after a ``def`` line of held-out files, and every drafter's output stays plain decoding's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from benchmark_module import load_benchmark

from parallm.bundled import BUNDLED_MODEL_DIR

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks/spec_real_bench.py"

SOURCE = '''"""A module."""

import os


class Walker:
    """Walks a tree."""

    def __init__(self, root):
        self.root = root

    def files(self):
        for dirpath, _, names in os.walk(self.root):
            for name in names:
                yield os.path.join(dirpath, name)


def count_files(root):
    return sum(1 for _ in Walker(root).files())
'''

pytestmark = pytest.mark.skipif(
    not (BUNDLED_MODEL_DIR / "config.json").exists(), reason="no bundled model"
)


def _corpus(tmp_path: Path) -> Path:
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    for i in range(4):
        (corpus / f"mod{i}.py").write_text(SOURCE.replace("Walker", f"Walker{i}"))
    return corpus


def _load_bench():
    return load_benchmark("spec_real_bench")


def test_prompts_end_after_a_def_line(tmp_path):
    bench = _load_bench()
    from parallm.tokenizer import load_tokenizer

    tok = load_tokenizer(BUNDLED_MODEL_DIR)
    prompts = bench.completion_prompts(str(_corpus(tmp_path)), 1.0, tok, 3, 512, seed=0)
    assert len(prompts) == 3
    for ids in prompts:
        last_line = tok.decode(ids).splitlines()[-1]
        assert last_line.lstrip().startswith("def ") and last_line.endswith(":")
    short = bench.completion_prompts(str(_corpus(tmp_path)), 1.0, tok, 3, 7, seed=0)
    assert [len(p) for p in short] == [7, 7, 7]
    assert [p[-7:] for p in prompts] == short


def test_real_bench_reports_each_drafter(tmp_path):
    out = tmp_path / "real.json"
    cmd = [sys.executable, str(BENCH), "--target", str(BUNDLED_MODEL_DIR), "--device", "cpu",
           "--dtype", "float32", "--corpus", str(_corpus(tmp_path)), "--val-fraction", "1",
           "--num-prompts", "3", "--max-tokens", "16", "--batch-sizes", "1,3",
           "--num-speculative-tokens", "3", "--skip-layers", "4", "--kv-cache-gib", "0.05",
           "--rounds", "1", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {(r["method"], r["batch"]): r for r in json.loads(out.read_text())}
    assert set(rows) == {(m, b) for m in ("ngram", "draft_model", "layer_skip") for b in (1, 3)}
    for batch in (1, 3):
        # The draft model is the target itself: every draft is accepted.
        assert rows[("draft_model", batch)]["tokens_per_step"] > 3.5
        assert 1 <= rows[("ngram", batch)]["tokens_per_step"] <= 4
        assert 1 <= rows[("layer_skip", batch)]["tokens_per_step"] < 4
    # At batch 1 the prefill steps (one token each) bring the mean over every step below the
    # drafted steps' mean.
    drafted = rows[("draft_model", 1)]
    assert 1 < drafted["tokens_per_engine_step"] < drafted["tokens_per_step"]
    assert all(r["tok_s"] > 0 and r["plain_tok_s"] > 0 for r in rows.values())
    assert all(0 <= r["overlapped_steps"] <= 1 for r in rows.values())
    assert all(r["identical_outputs"] == 1.0 for r in rows.values())  # float32


def test_a_drafted_output_that_differs_is_reported_not_fatal(tmp_path, monkeypatch):
    """In half precision on a GPU the verify step may break a near tie the other way than the
    decode graph: the bench reports the share of identical outputs and goes on measuring."""
    bench = _load_bench()
    timed_run = bench.timed_run

    def timed_run_with_a_flipped_token(llm, prompts, params, batch, queue=False):
        outs, seconds = timed_run(llm, prompts, params, batch, queue)
        if llm.engine.drafter is not None:  # as if one verify step broke a tie differently
            outs[0] = outs[0][:-1] + [outs[0][-1] + 1]
        return outs, seconds

    monkeypatch.setattr(bench, "timed_run", timed_run_with_a_flipped_token)
    args = bench.parse_args(["--target", str(BUNDLED_MODEL_DIR), "--device", "cpu",
                             "--dtype", "float32", "--corpus", str(_corpus(tmp_path)),
                             "--val-fraction", "1", "--num-prompts", "2", "--max-tokens", "4",
                             "--batch-sizes", "2", "--methods", "ngram,layer_skip",
                             "--num-speculative-tokens", "2", "--skip-layers", "4",
                             "--kv-cache-gib", "0.05"])  # fmt: skip
    rows = bench.run(args)
    assert [(r["method"], r["identical_outputs"]) for r in rows] == [
        ("ngram", 0.5),
        ("layer_skip", 0.5),
    ]
    # The one output that parts is reported with plain decoding's top-2 margin where it parts.
    for row in rows:
        (margin,) = row["divergence_margins"]
        assert 0 <= margin < float("inf")


def test_divergence_margin_is_taken_where_the_outputs_part():
    bench = _load_bench()
    plain = [[5, 6, 7, 8], [1, 2, 3], [4, 4], [9, 9, 9]]
    margins = [bench.Margins([5, 6, 7, 8], [0.5, 0.25, 0.125, 2.0]),
               bench.Margins([1, 2, 3], [3.0, 3.0, 3.0]),
               bench.Margins([4, 4], [1.0, 1.0]),
               # the logprobs run itself parted from the timed run at its second token
               bench.Margins([9, 8, 8], [4.0, 4.0, 4.0])]  # fmt: skip
    outs = [[5, 6, 9, 8], [1, 2, 3], [4, 4, 4], [9, 9, 1]]  # parts at 2; same; longer; at 2
    assert bench.divergence_gaps(outs, plain, margins) == [0.125, float("inf"), None]
    assert "widest margin parted 0.125 (1 where" in bench._parted_note([0.125, None])


def test_unknown_method_is_named(tmp_path):
    cmd = [sys.executable, str(BENCH), "--target", str(BUNDLED_MODEL_DIR), "--device", "cpu",
           "--corpus", str(_corpus(tmp_path)), "--val-fraction", "1", "--num-prompts", "1",
           "--methods", "medusa"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--methods" in proc.stderr and "medusa" in proc.stderr


def test_min_tokens_per_step_reaches_every_drafter():
    bench = _load_bench()
    common = ["--target", "x", "--methods", "ngram,layer_skip"]
    auto = bench.drafter_configs(bench.parse_args([*common, "--min-tokens-per-step", "auto"]), 8)
    assert {c["min_tokens_per_step"] for c in auto.values()} == {"auto"}
    fixed = bench.drafter_configs(bench.parse_args([*common, "--min-tokens-per-step", "1.5"]), 8)
    assert {c["min_tokens_per_step"] for c in fixed.values()} == {1.5}
    unset = bench.drafter_configs(bench.parse_args(common), 8)
    assert all("min_tokens_per_step" not in c for c in unset.values())


def test_ngram_history_is_ngram_with_the_ring_of_earlier_requests():
    from parallm.engine.spec.config import SpeculativeConfig

    bench = _load_bench()
    common = ["--target", "x", "--methods", "ngram,ngram_history", "--prompt-lookup-min", "1"]
    configs = bench.drafter_configs(bench.parse_args(common), 8)
    assert configs["ngram_history"] == {**configs["ngram"], "prompt_lookup_history_tokens": 1 << 16}
    assert configs["ngram"]["prompt_lookup_min"] == 1
    small = bench.parse_args([*common, "--prompt-lookup-history-tokens", "4096"])
    spec = SpeculativeConfig.from_value(bench.drafter_configs(small, 8)["ngram_history"])
    assert spec.prompt_lookup_history_tokens == 4096


def test_several_k_run_each_drafter_once_per_k():
    bench = _load_bench()
    args = bench.parse_args(["--target", "x", "--methods", "ngram,layer_skip",
                             "--num-speculative-tokens", "4,8", "--skip-layers", "3"])  # fmt: skip
    configs = bench.drafter_configs(args, 12)
    assert {label: (c["method"], c["num_speculative_tokens"]) for label, c in configs.items()} == {
        "ngram k=4": ("ngram", 4),
        "layer_skip k=4": ("layer_skip", 4),
        "ngram k=8": ("ngram", 8),
        "layer_skip k=8": ("layer_skip", 8),
    }
    one = bench.drafter_configs(bench.parse_args(["--target", "x", "--methods", "ngram"]), 12)
    assert list(one) == ["ngram"] and one["ngram"]["num_speculative_tokens"] == 4


def test_rounds_alternate_the_engines_after_an_untimed_pass(monkeypatch):
    """Warm-up passes first, then A B B A: a drift in the machine's speed weighs on both
    engines alike; each pass starts from an empty prefix cache (and an empty ring of earlier
    requests: a pass drafts from its own); the first timed pass's outputs are reported."""
    bench = _load_bench()
    calls = []

    class Ring:
        def clear(self):
            calls.append("clear B")

    class Engine:
        def __init__(self, name, drafter):
            self.name = name
            self.engine = SimpleNamespace(drafter=drafter)

        def reset_prefix_cache(self):
            calls.append(f"reset {self.name}")

    def timed_run(llm, prompts, params, batch, queue=False):
        calls.append(llm.name)
        return [[len(calls)]], float(len(calls))

    monkeypatch.setattr(bench, "timed_run", timed_run)
    engines = {
        "plain": Engine("A", None),
        "ngram_history": Engine("B", SimpleNamespace(history=Ring())),
    }
    got = bench.measure_rounds(engines, [[1]], None, 1, rounds=3)
    runs = [c for c in calls if c in ("A", "B")]
    assert runs == ["A", "B", "A", "B", "B", "A", "A", "B"]
    before = {"A": ["reset A"], "B": ["reset B", "clear B"]}
    at = 0
    for name in runs:
        assert calls[at : at + len(before[name]) + 1] == [*before[name], name]
        at += len(before[name]) + 1
    assert got["plain"] == ([[7]], [7.0, 15.0, 17.0])
    assert got["ngram_history"] == ([[10]], [10.0, 13.0, 20.0])


def test_queue_runs_every_prompt_at_once_a_batch_at_a_time(tmp_path):
    """``--queue``: all prompts in one call with ``batch`` of them running at a time (the
    engine's ``max_num_seqs`` lowered for the call, then restored); waves: ``batch`` prompts a
    call. Both give plain decoding's outputs in order."""
    from parallm import LLM, SamplingParams

    bench = _load_bench()
    llm = LLM(str(BUNDLED_MODEL_DIR), device="cpu", dtype="float32", max_model_len=256,
              max_num_seqs=4)  # fmt: skip
    prompts = bench.completion_prompts(str(_corpus(tmp_path)), 1.0, llm.get_tokenizer(), 3, 32,
                                       seed=0)  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    widths, calls, launch, generate = [], [], llm.engine.runner.launch, llm.generate

    def recorded(batch, *args, **kwargs):
        widths.append(len(batch.seqs))
        return launch(batch, *args, **kwargs)

    def counted(chunk, *args, **kwargs):
        calls.append(len(chunk))
        return generate(chunk, *args, **kwargs)

    llm.engine.runner.launch, llm.generate = recorded, counted
    waves, _ = bench.timed_run(llm, prompts, params, 2)
    assert calls == [2, 1]
    calls.clear()
    queued, _ = bench.timed_run(llm, prompts, params, 2, queue=True)
    assert calls == [3] and max(widths) == 2
    assert queued == waves and [len(o) for o in queued] == [6, 6, 6]
    assert llm.engine.scheduler.cfg.max_num_seqs == 4
