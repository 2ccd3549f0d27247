"""benchmarks/peers/server_counters.py: one reader for both servers' /metrics, and the
difference over a load (steps, tokens a step, ms a step, steps per tokens-a-step bin)."""

from __future__ import annotations

import pytest
from benchmark_module import load_benchmark


@pytest.fixture(scope="module")
def counters():
    return load_benchmark("peers/server_counters")


def _body(prefix: str, steps: int, tokens: int, small: int, prompt: int, hits: int) -> str:
    """A /metrics body as prometheus_client writes one, with two engines' series where a
    data-parallel server has them: ``small`` of ``steps`` steps carried at most 8 tokens."""
    lines = []
    for engine in ("0", "1"):
        labels = f'engine="{engine}",model_name="m"'
        lines += [
            f"# TYPE {prefix}iteration_tokens_total histogram",
            f'{prefix}iteration_tokens_total_bucket{{{labels},le="8.0"}} {small}',
            f'{prefix}iteration_tokens_total_bucket{{{labels},le="512.0"}} {steps}',
            f'{prefix}iteration_tokens_total_bucket{{{labels},le="+Inf"}} {steps}',
            f"{prefix}iteration_tokens_total_count{{{labels}}} {steps}",
            f"{prefix}iteration_tokens_total_sum{{{labels}}} {tokens}",
            f"# TYPE {prefix}prompt_tokens counter",
            f"{prefix}prompt_tokens_total{{{labels}}} {prompt}",
            f"# TYPE {prefix}prefix_cache_queries counter",
            f"{prefix}prefix_cache_queries_total{{{labels}}} {prompt}",
            f"# TYPE {prefix}prefix_cache_hits counter",
            f"{prefix}prefix_cache_hits_total{{{labels}}} {hits}",
        ]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("prefix", ["vllm:", "parallm:"])
def test_a_load_reads_the_same_from_either_server(counters, prefix):
    before = counters.parse(_body(prefix, steps=10, tokens=300, small=4, prompt=200, hits=0))
    after = counters.parse(_body(prefix, steps=60, tokens=2300, small=34, prompt=1200, hits=100))
    assert before["steps"] == 20 and before["buckets"][8.0] == 8  # both engines summed
    d = counters.difference(before, after, duration_s=2.0)
    assert d["steps"] == 100 and d["step_tokens"] == 4000 and d["prompt_tokens"] == 2000
    assert d["tokens_per_step"] == 40 and d["steps_per_s"] == 50 and d["ms_per_step"] == 20
    assert d["prefix_hit_share"] == pytest.approx(200 / 2000)
    # 60 new steps of at most 8 tokens, 40 of 9-512, none above: the bins are not cumulative.
    assert d["steps_by_tokens"] == {"<=8": 60, "<=512": 40, "<=inf": 0}
    assert "preemptions" not in d  # absent from this body: left out, not read as zero


def test_no_steps_gives_no_rates(counters):
    body = counters.parse(_body("vllm:", steps=5, tokens=50, small=5, prompt=10, hits=0))
    d = counters.difference(body, body, duration_s=1.0)
    assert d["steps"] == 0 and "ms_per_step" not in d and "tokens_per_step" not in d
