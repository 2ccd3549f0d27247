"""What a server's engine did during one serving load, read from its Prometheus /metrics before
and after the load: engine steps, tokens a step, prompt tokens computed and found in the prefix
cache, preemptions. Both servers name these alike (vLLM's ``vllm:`` names; parallm's are the
same with ``parallm:``), so one reader serves both. Steps are the tokens-a-step histogram's
count: parallm observes every step it launches; vLLM 0.26's API server every step whose
outputs reach it (a step of prompt chunks alone returns none and is not counted).

Why: a TPOT gap under a trace is either more steps or slower ones. The bench's duration over
the steps counted here is the mean step time of a server kept busy; the tokens a step say how
the two schedulers packed the same requests (RESULTS, twenty-fourth session: the 8B at x4, where
parallm's ITL p90 is 1.65x vLLM's).
"""

from __future__ import annotations

import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

# Samples read, by their name without the engine's prefix (summed over every label set, so
# data-parallel engines and vLLM's per-engine series count once).
COUNTERS = {
    "steps": "iteration_tokens_total_count",
    "step_tokens": "iteration_tokens_total_sum",
    "prompt_tokens": "prompt_tokens_total",
    "generation_tokens": "generation_tokens_total",
    "prefix_cache_queries": "prefix_cache_queries_total",
    "prefix_cache_hits": "prefix_cache_hits_total",
    "preemptions": "num_preemptions_total",
    "overlapped_steps": "num_overlapped_steps_total",  # parallm's own
}
BUCKETS = "iteration_tokens_total_bucket"
PREFIXES = ("vllm:", "parallm:")


def parse(text: str) -> dict[str, Any]:
    """The counters of one /metrics body: ``COUNTERS``' keys (absent ones left out) and
    ``buckets``, the cumulative step counts of the tokens-a-step histogram by upper bound."""
    sums: dict[str, float] = {}
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = _strip_prefix(sample.name)
            if name == BUCKETS:
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
            else:
                sums[name] = sums.get(name, 0.0) + sample.value
    out: dict[str, Any] = {key: sums[name] for key, name in COUNTERS.items() if name in sums}
    out["buckets"] = dict(sorted(buckets.items()))
    return out


def _strip_prefix(name: str) -> str:
    for prefix in PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def scrape(base_url: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """``parse`` of ``GET {base_url}/metrics``."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=timeout_s) as response:
        return parse(response.read().decode())


def difference(before: dict[str, Any], after: dict[str, Any], duration_s: float) -> dict[str, Any]:
    """What happened between two ``parse`` results, over a load of ``duration_s`` seconds:
    each counter's increase, tokens a step, steps a second, mean ms a step (the load's
    duration over its steps: a step's cost where the engine never idled), the prefix cache's
    hit share, the share of steps launched ahead (parallm), and steps per tokens-a-step bin (``"<=512"``: more than the bound before)."""
    d = {key: after[key] - before.get(key, 0.0) for key in COUNTERS if key in after}
    steps = d.get("steps", 0.0)
    if steps:
        d["tokens_per_step"] = d["step_tokens"] / steps
        d["steps_per_s"] = steps / duration_s
        d["ms_per_step"] = 1000.0 * duration_s / steps
        if "overlapped_steps" in d:
            d["overlapped_share"] = d["overlapped_steps"] / steps
    if d.get("prefix_cache_queries"):
        d["prefix_hit_share"] = d["prefix_cache_hits"] / d["prefix_cache_queries"]
    bins, below = {}, 0.0
    for bound, count in after["buckets"].items():
        cumulative = count - before.get("buckets", {}).get(bound, 0.0)
        label = "inf" if bound == float("inf") else f"{bound:g}"
        bins[f"<={label}"] = cumulative - below
        below = cumulative
    d["steps_by_tokens"] = bins
    return d
