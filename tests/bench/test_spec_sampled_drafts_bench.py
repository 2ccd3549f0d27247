"""benchmarks/spec_sampled_drafts_bench.py on CPU with tiny random models: it runs, reports both
kinds of drafts per temperature, and on a flat target (temperature 1.5) sampled drafts are
accepted more often than argmax drafts (a count of accepted drafts, not a timing)."""

from __future__ import annotations

from benchmark_module import load_benchmark


def _bench():
    return load_benchmark("spec_sampled_drafts_bench")


def test_sampled_drafts_are_accepted_more_than_greedy_ones_on_a_flat_target(tiny_model_dir, capsys):
    bench = _bench()
    model = str(tiny_model_dir("qwen3"))
    args = bench.parse_args(["--target", model, "--draft-model", model, "--draft-noise", "0.03",
                             "--temperatures", "1.5", "--num-prompts", "6", "--prompt-len", "24",
                             "--max-tokens", "24", "--device", "cpu"])  # fmt: skip
    rows = bench.run(args)
    by_drafts = {row["drafts"]: row for row in rows}
    assert set(by_drafts) == {"sampled", "greedy"}
    assert all(row["draft_tokens"] > 0 for row in rows)
    assert by_drafts["sampled"]["acceptance"] > by_drafts["greedy"]["acceptance"]
    assert by_drafts["sampled"]["tokens_per_step"] > by_drafts["greedy"]["tokens_per_step"]
    assert "sampled drafts" in capsys.readouterr().out
