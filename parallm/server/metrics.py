"""Prometheus metrics of the server: engine gauges, token counters and latency histograms.

Names and labels are vLLM's with the ``parallm:`` prefix in place of ``vllm:``, so that a
vLLM dashboard works after that one substitution. Each server owns its registry (several
servers may live in one process, as in tests). Gauges are read at scrape time from the
snapshots the engine cores publish after every step, one series per engine (label ``engine``,
its data-parallel index, as vLLM labels them); counters and histograms are updated by the
delivery threads as steps run and outputs are delivered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from parallm.engine.core.messages import EngineStats
from parallm.outputs import RequestMetrics

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "parallm:"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)  # fmt: skip
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                50.0, 60.0, 120.0, 240.0, 480.0)  # fmt: skip
# vLLM's request phase buckets, with finer ones below 0.3 s for a fast engine's short phases.
_PHASE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0,
                  10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0,
                  7680.0)  # fmt: skip
_ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


# The engine's counters after a step, as the engine core reports them (one definition for
# both sides of the process boundary).
EngineSnapshot = EngineStats


class ServerMetrics:
    """All metrics of one server; ``render()`` is the body of ``GET /metrics``."""

    def __init__(
        self,
        snapshots: Callable[[], Sequence[EngineSnapshot]],
        model_name: str,
        max_model_len: int = 2048,
    ) -> None:
        """``snapshots`` returns the latest counters of each engine (one per data-parallel
        replica), which /metrics labels with ``engine="<index>"`` as vLLM does."""
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"model_name": model_name}

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, [*labels, *extra], registry=self.registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            h = Histogram(PREFIX + name, doc, list(labels), buckets=buckets, registry=self.registry)
            return h.labels(**labels)

        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens admitted.").labels(**labels)
        self.generation_tokens = counter("generation_tokens", "Tokens generated.").labels(**labels)
        self._success = counter(
            "request_success", "Requests finished, by reason.", ("finished_reason",)
        )
        self._model = model_name
        self.rejected = counter("request_rejected", "Requests refused with 429.").labels(**labels)
        self.failed = counter("request_failed", "Requests failed by an error.").labels(**labels)
        self.aborted = counter("request_aborted", "Requests aborted (client left).").labels(
            **labels
        )
        self.ttft = histogram(
            "time_to_first_token_seconds", "Time from arrival to first token.", _TTFT_BUCKETS
        )
        self.itl = histogram(
            "inter_token_latency_seconds", "Time between consecutive tokens.", _ITL_BUCKETS
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds", "Time from arrival to the last token.", _E2E_BUCKETS
        )
        self.queue_time = histogram(
            "request_queue_time_seconds", "Time from arrival to first scheduled (WAITING).",
            _PHASE_BUCKETS,
        )  # fmt: skip
        self.prefill_time = histogram(
            "request_prefill_time_seconds", "Time from first scheduled to first token (PREFILL).",
            _PHASE_BUCKETS,
        )  # fmt: skip
        self.decode_time = histogram(
            "request_decode_time_seconds", "Time from first token to last token (DECODE).",
            _PHASE_BUCKETS,
        )  # fmt: skip
        self.inference_time = histogram(
            "request_inference_time_seconds",
            "Time from first scheduled to last token (RUNNING).", _PHASE_BUCKETS,
        )  # fmt: skip
        token_buckets = _buckets_1_2_5(max_model_len)
        self.request_prompt_tokens = histogram(
            "request_prompt_tokens", "Prompt length of finished requests.", token_buckets
        )
        self.request_generation_tokens = histogram(
            "request_generation_tokens",
            "Tokens generated by finished requests (all n samples).", token_buckets,
        )  # fmt: skip
        self.iteration_tokens = histogram(
            "iteration_tokens_total",
            "Tokens computed per engine step (prompt chunks and decode tokens).",
            _ITERATION_TOKEN_BUCKETS,
        )  # fmt: skip
        self.registry.register(_EngineCollector(snapshots, labels))
        # process_resident_memory_bytes and friends: the load test watches the server's memory.
        ProcessCollector(registry=self.registry)

    def finished(self, reason: str) -> None:
        self._success.labels(model_name=self._model, finished_reason=reason).inc()

    def request_done(
        self, times: RequestMetrics, num_prompt_tokens: int, num_generation_tokens: int
    ) -> None:
        """Observe the phase times and lengths of a request that finished normally."""
        phases = (
            (self.queue_time, times.time_in_queue),
            (self.prefill_time, times.prefill_time),
            (self.decode_time, times.decode_time),
            (self.inference_time, times.inference_time),
        )
        for histogram, seconds in phases:
            if seconds is not None:
                histogram.observe(seconds)
        self.request_prompt_tokens.observe(num_prompt_tokens)
        self.request_generation_tokens.observe(num_generation_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """Gauges (and the engines' own cumulative counters) read from the latest snapshots, one
    series per engine (label ``engine``: its data-parallel index)."""

    def __init__(
        self, snapshots: Callable[[], Sequence[EngineSnapshot]], labels: dict[str, str]
    ) -> None:
        self._snapshots = snapshots
        self._labels = labels

    def collect(self) -> Iterator[Metric]:
        snapshots = list(self._snapshots())
        names = [*self._labels, "engine"]
        label_values = [[*self._labels.values(), str(i)] for i in range(len(snapshots))]
        gauges = {
            "num_requests_running": ("Requests with a sequence running.",
                                     lambda s: s.num_requests_running),
            "num_requests_waiting": ("Requests queued, not yet running.",
                                     lambda s: s.num_requests_waiting),
            "kv_cache_usage_perc": ("Fraction of KV blocks held by live requests.",
                                    lambda s: s.kv_cache_usage),
            "kv_cache_blocks_in_use": ("KV blocks held by live requests.",
                                       lambda s: s.num_blocks_in_use),
            "kv_cache_blocks_total": ("KV blocks in the cache.", lambda s: s.num_blocks),
            "prefix_cache_cached_blocks": ("Free blocks kept for prefix reuse.",
                                           lambda s: s.num_cached_blocks),
            "prefix_cache_hit_rate": ("Prefix cache hit tokens / queried tokens, since start.",
                                      lambda s: s.prefix_cache_hit_rate),
        }  # fmt: skip
        counters = {
            "prefix_cache_queries": ("Prompt tokens looked up in the prefix cache.",
                                     lambda s: s.prefix_cache_queries),
            "prefix_cache_hits": ("Prompt tokens found in the prefix cache.",
                                  lambda s: s.prefix_cache_hits),
            "num_preemptions": ("Sequences preempted for lack of KV blocks.",
                                lambda s: s.num_preemptions),
            "num_overlapped_steps": ("Engine steps launched before the previous step's tokens "
                                     "reached the host (async scheduling).",
                                     lambda s: s.num_overlapped_steps),
            "spec_decode_num_drafts": ("Sequence steps that carried draft tokens.",
                                       lambda s: s.spec_num_drafts),
            "spec_decode_num_draft_tokens": ("Draft tokens verified.",
                                             lambda s: s.spec_num_draft_tokens),
            "spec_decode_num_accepted_tokens": ("Draft tokens accepted.",
                                                lambda s: s.spec_num_accepted_tokens),
        }  # fmt: skip
        for kind, table in ((GaugeMetricFamily, gauges), (CounterMetricFamily, counters)):
            for name, (doc, read) in table.items():
                family = kind(PREFIX + name, doc, labels=names)
                for values, s in zip(label_values, snapshots, strict=True):
                    family.add_metric(values, read(s))
                yield family
        per_position = CounterMetricFamily(
            PREFIX + "spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted, by their position in the draft (0 first).",
            labels=[*names, "position"],
        )
        for values, s in zip(label_values, snapshots, strict=True):
            for position, value in enumerate(s.spec_accepted_per_position):
                per_position.add_metric([*values, str(position)], value)
        yield per_position


def _buckets_1_2_5(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value`` (vLLM's token-count buckets)."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return tuple(buckets)
            buckets.append(mantissa * scale)
        scale *= 10
