"""benchmarks/trace_contexts.py: the decode contexts the benches draw from the Azure trace."""

from __future__ import annotations

import numpy as np
from benchmark_module import load_benchmark
from trace_files import write_trace

bench = load_benchmark("trace_contexts")


def test_contexts_are_consecutive_requests_part_way_through_their_outputs(tmp_path):
    rows = [(100 * (i + 1), 10) for i in range(40)] + [(9000, 0)]  # the last one capped
    prompts, outputs = bench.trace_requests(write_trace(tmp_path / "t.csv", rows))
    assert prompts[-1] == bench.MAX_PROMPT and prompts[0] == 100 and outputs[0] == 10
    rng = np.random.default_rng(0)
    for _ in range(20):
        contexts = bench.draw_contexts(prompts, outputs, 8, rng)
        assert len(contexts) == 8
        first = next(i for i, p in enumerate(prompts) if p <= contexts[0] < p + 10)
        for i, c in enumerate(contexts):  # consecutive, each prompt plus at most its output
            assert prompts[first + i] <= c <= prompts[first + i] + outputs[first + i]
