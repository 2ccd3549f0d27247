"""Request phase metrics: per-request timestamps (offline and in /metrics), per-step token
counts, and the server's periodic stats log line."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator

import httpx
import pytest
import torch
from server_support import MODEL_NAME, metrics, tiny_model_path, wait_until_idle

from parallm import LLM, SamplingParams
from parallm.cli import main as cli_main
from parallm.server.app import build_app
from parallm.server.launcher import ServerThread, load_engine
from parallm.server.metrics import EngineSnapshot
from parallm.server.stats_log import StatsLog

ENGINE_KWARGS = dict(device="cpu", kv_cache_memory=4 << 20, max_model_len=256)
STATS_INTERVAL_S = 0.05
P = "parallm:"


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    """A server of its own, logging stats every few milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = load_engine(model=str(tiny_model_path()), **ENGINE_KWARGS)
    app = build_app(engine, MODEL_NAME, log_stats_interval_s=STATS_INTERVAL_S)
    try:
        with ServerThread(app) as s:
            yield s
    finally:
        torch.set_num_threads(threads)


def _complete(server: ServerThread, prompt: str, max_tokens: int, n: int = 1) -> dict:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "n": n,
            "ignore_eos": True, "temperature": 0}  # fmt: skip
    response = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def _delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after[P + name] - before.get(P + name, 0.0)


def test_request_histograms_over_http(server: ServerThread) -> None:
    before = metrics(server)
    requests = [("def alpha(x):", 5, 1), ("class Beta:", 3, 2), ("import gamma", 1, 1)]
    usages = [_complete(server, p, k, n)["usage"] for p, k, n in requests]
    after = metrics(server)

    prompt_lens = [u["prompt_tokens"] for u in usages]
    generated = [u["completion_tokens"] for u in usages]
    assert generated == [k * n for _, k, n in requests]
    assert _delta(after, before, "request_prompt_tokens_count") == len(requests)
    assert _delta(after, before, "request_prompt_tokens_sum") == sum(prompt_lens)
    assert _delta(after, before, "request_generation_tokens_count") == len(requests)
    assert _delta(after, before, "request_generation_tokens_sum") == sum(generated)
    phases = ("queue", "prefill", "decode", "inference")
    for phase in phases:
        assert _delta(after, before, f"request_{phase}_time_seconds_count") == len(requests)
        assert _delta(after, before, f"request_{phase}_time_seconds_sum") >= 0
    # queue + prefill + decode run from arrival to the last token: within end-to-end latency.
    in_phases = sum(_delta(after, before, f"request_{p}_time_seconds_sum") for p in phases[:3])
    assert in_phases <= _delta(after, before, "e2e_request_latency_seconds_sum")
    # A step computes each sequence's uncached prompt tokens once, then one token per decode
    # step; a sequence's last sampled token is never fed back.
    num_seqs = sum(n for _, _, n in requests)
    prompt_per_seq = sum(
        length * n for length, (_, _, n) in zip(prompt_lens, requests, strict=True)
    )
    cache_hits = _delta(after, before, "prefix_cache_hits_total")
    expected = prompt_per_seq - cache_hits + sum(generated) - num_seqs
    assert _delta(after, before, "iteration_tokens_total_sum") == expected
    assert _delta(after, before, "iteration_tokens_total_count") >= max(k for _, k, _ in requests)


def test_steps_launched_ahead_are_counted_apart(server: ServerThread) -> None:
    """On CPU async scheduling is off by default: every step waited for the last one's tokens.
    With it on, a lone request's decode steps run ahead (its first step, the prompt's, cannot),
    and /metrics counts them beside all steps: the share that serving benchmarks compare."""
    before = metrics(server)
    _complete(server, "def epsilon():", 6)
    after = metrics(server)
    assert _delta(after, before, "num_overlapped_steps_total") == 0
    assert _delta(after, before, "iteration_tokens_total_count") >= 6
    engine = load_engine(model=str(tiny_model_path()), async_scheduling=True, **ENGINE_KWARGS)
    with ServerThread(build_app(engine, MODEL_NAME)) as ahead:
        _complete(ahead, "def epsilon():", 6)
        values = wait_until_idle(ahead)
    steps = values[P + "iteration_tokens_total_count"]
    overlapped = values[P + "num_overlapped_steps_total"]
    assert overlapped == engine.num_overlapped_steps and 0 < overlapped < steps


def test_server_logs_a_stats_line_while_busy(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="parallm")
    _complete(server, "def delta():", 8)
    # Wait (the deadline only bounds a failure) for a line that counted generated tokens.
    deadline = time.monotonic() + 30
    while not any(float(m.group(2)) > 0 for m in _stats_lines(caplog)):
        assert time.monotonic() < deadline, f"no stats line with tokens: {caplog.records}"
        time.sleep(STATS_INTERVAL_S)


_STATS_LINE = re.compile(
    r"Avg prompt throughput: (\d+\.\d) tokens/s, Avg generation throughput: (\d+\.\d) tokens/s, "
    r"Running: \d+ reqs, Waiting: \d+ reqs, GPU KV cache usage: \d+\.\d%, "
    r"Prefix cache hit rate: \d+\.\d%"
)


def _stats_lines(caplog: pytest.LogCaptureFixture) -> list[re.Match]:
    return [m for r in list(caplog.records)
            if r.name == "parallm" and r.levelno == logging.INFO
            and (m := _STATS_LINE.fullmatch(r.getMessage()))]  # fmt: skip


def test_offline_request_metrics_are_ordered() -> None:
    llm = LLM(model=str(tiny_model_path()), **ENGINE_KWARGS)
    params = [SamplingParams(max_tokens=4, ignore_eos=True),
              SamplingParams(max_tokens=3, n=2, ignore_eos=True, seed=0)]  # fmt: skip
    outs = llm.generate(["def f(x):", "import os"], params, use_tqdm=False)
    for out in outs:
        m = out.metrics
        times = [m.arrival_time, m.first_scheduled_time, m.first_token_time, m.last_token_time,
                 m.finished_time]  # fmt: skip
        assert None not in times, m
        assert times == sorted(times), m
        assert m.time_in_queue == m.first_scheduled_time - m.arrival_time
        assert m.prefill_time == m.first_token_time - m.first_scheduled_time
        assert m.decode_time == m.last_token_time - m.first_token_time

    # A caller's arrival time is kept; streamed outputs are finished only at the end.
    arrival = time.monotonic() - 5.0
    llm.engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True),
                           stream=True, arrival_time=arrival)  # fmt: skip
    deltas = []
    while llm.engine.has_unfinished_requests():
        deltas += llm.engine.step()
    assert [d.metrics.arrival_time for d in deltas] == [arrival] * 3
    assert [d.metrics.finished_time is None for d in deltas] == [True, True, False]
    assert deltas[-1].metrics.time_in_queue >= 5.0


class _FakeEngine:
    def __init__(self) -> None:
        self.snapshot = EngineSnapshot(num_blocks=100)
        self.now = 1000.0


def _info_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]


def test_stats_log_line_with_a_fake_clock(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="parallm")
    fake = _FakeEngine()
    stats = StatsLog(lambda: fake.snapshot, lambda: fake.now)

    fake.now += 10.0
    fake.snapshot = EngineSnapshot(
        num_requests_running=2, num_requests_waiting=1, num_blocks=100, num_blocks_in_use=25,
        prefix_cache_queries=500, prefix_cache_hits=200, num_prompt_tokens_computed=300,
        num_generated_tokens=125,
    )  # fmt: skip
    stats.log()
    fake.now += 5.0
    fake.snapshot = EngineSnapshot(
        num_requests_running=1, num_blocks=100, num_blocks_in_use=10, prefix_cache_queries=600,
        prefix_cache_hits=300, num_prompt_tokens_computed=350, num_generated_tokens=225,
    )  # fmt: skip
    stats.log()
    # Idle now: one more line shows the drop to zero (the hit rate of the last lookups stays).
    fake.now += 10.0
    fake.snapshot = EngineSnapshot(
        num_blocks=100, prefix_cache_queries=600, prefix_cache_hits=300,
        num_prompt_tokens_computed=350, num_generated_tokens=225,
    )  # fmt: skip
    stats.log()
    fake.now += 10.0
    stats.log()  # still idle: nothing at INFO

    assert _info_lines(caplog) == [
        "Avg prompt throughput: 30.0 tokens/s, Avg generation throughput: 12.5 tokens/s, "
        "Running: 2 reqs, Waiting: 1 reqs, GPU KV cache usage: 25.0%, "
        "Prefix cache hit rate: 40.0%",
        "Avg prompt throughput: 10.0 tokens/s, Avg generation throughput: 20.0 tokens/s, "
        "Running: 1 reqs, Waiting: 0 reqs, GPU KV cache usage: 10.0%, "
        "Prefix cache hit rate: 100.0%",
        "Avg prompt throughput: 0.0 tokens/s, Avg generation throughput: 0.0 tokens/s, "
        "Running: 0 reqs, Waiting: 0 reqs, GPU KV cache usage: 0.0%, "
        "Prefix cache hit rate: 100.0%",
    ]
    assert {r.name for r in caplog.records} == {"parallm"}


def test_stats_log_reports_requests_stuck_waiting(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="parallm")
    fake = _FakeEngine()
    stats = StatsLog(lambda: fake.snapshot, lambda: fake.now)
    fake.now += 10.0
    fake.snapshot = EngineSnapshot(num_requests_waiting=3, num_blocks=100)
    stats.log()
    assert _info_lines(caplog) == [
        "Avg prompt throughput: 0.0 tokens/s, Avg generation throughput: 0.0 tokens/s, "
        "Running: 0 reqs, Waiting: 3 reqs, GPU KV cache usage: 0.0%, "
        "Prefix cache hit rate: 0.0%"
    ]


def test_build_app_rejects_a_bad_stats_interval() -> None:
    engine = load_engine(model=str(tiny_model_path()), **ENGINE_KWARGS)
    with pytest.raises(ValueError, match="log_stats_interval_s"):
        build_app(engine, log_stats_interval_s=0)


@pytest.mark.parametrize(("flags", "log_stats"), [([], True), (["--disable-log-stats"], False)])
def test_serve_logs_stats_at_info_unless_disabled(
    monkeypatch: pytest.MonkeyPatch, flags: list[str], log_stats: bool
) -> None:
    import parallm.server.app as app_module
    import parallm.server.launcher as launcher

    class Engine:
        def summary(self) -> str:
            return "engine"

    built: dict = {}
    monkeypatch.setattr(launcher, "load_engine", lambda **kwargs: Engine())
    monkeypatch.setattr(launcher, "run_server", lambda *args, **kwargs: None)
    monkeypatch.setattr(app_module, "build_app", lambda *args, **kwargs: built.update(kwargs))
    parallm_logger = logging.getLogger("parallm")
    level = parallm_logger.level
    try:
        argv = ["serve", "--model", str(tiny_model_path()), "--disable-frontend-multiprocessing"]
        assert cli_main([*argv, *flags]) == 0
        assert parallm_logger.getEffectiveLevel() == logging.INFO
    finally:
        parallm_logger.setLevel(level)
    assert built["log_stats"] is log_stats


def test_speculative_decoding_counters_over_http() -> None:
    """A server with n-gram drafts counts drafts and accepted drafts (total and by position)
    as the engine does; a draft per position is never accepted more often than proposed."""
    from server_support import API_KEY, running_server

    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}
    with running_server(speculative_config=spec, multiprocess=False) as server:
        body = {"model": MODEL_NAME, "prompt": [5, 6, 7, 8] * 6, "max_tokens": 24,
                "ignore_eos": True, "temperature": 0}  # fmt: skip
        auth = {"Authorization": f"Bearer {API_KEY}"}
        for _ in range(2):
            r = httpx.post(server.url + "/v1/completions", json=body, headers=auth, timeout=60)
            assert r.status_code == 200
        wait_until_idle(server)
        values = metrics(server)
        text = httpx.get(server.url + "/metrics").text
        engine = server.app.state.ctx.engine.engine
    stats = engine.spec_stats
    assert stats.draft_tokens > 0
    assert values["parallm:spec_decode_num_draft_tokens_total"] == stats.draft_tokens
    assert values["parallm:spec_decode_num_accepted_tokens_total"] == stats.accepted_tokens
    assert values["parallm:spec_decode_num_drafts_total"] == stats.num_proposals
    positions = re.findall(
        r'spec_decode_num_accepted_tokens_per_pos_total\{[^}]*position="(\d+)"\} (\S+)', text
    )
    assert [float(v) for _, v in positions] == [float(v) for v in stats.accepted_per_position]
