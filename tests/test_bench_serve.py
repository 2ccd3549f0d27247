"""``parallm bench serve``: the SSE parser, the statistics, trace parsing, and full runs against
the real server with a tiny model (a few seconds of the Azure conversation trace, and Poisson)."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_server_support import API_KEY, MODEL_NAME, running_server, tiny_model_path

from parallm.bench import serve
from parallm.bench.serve_client import RequestResult, SSEParser
from parallm.bench.serve_report import distribution_ms, meets_slo, summarize
from parallm.bench.serve_workload import (
    PromptMaker,
    build_requests,
    load_trace,
    poisson_shapes,
    trace_shapes,
)
from parallm.cli import build_parser
from parallm.server.launcher import ServerThread

SHARED = Path(__file__).resolve().parents[2] / "shared"
CONV_TRACE = SHARED / "traces" / "AzureLLMInferenceTrace_conv.csv"
needs_trace = pytest.mark.skipif(not CONV_TRACE.exists(), reason="no shared Azure trace")


# ---- unit tests ------------------------------------------------------------------------------


def test_sse_parser_any_chunking() -> None:
    stream = (
        ": keep-alive\r\n\r\n"
        'data: {"a": 1}\r\n\r\n'
        "event: message\ndata: line one\ndata:line two\n\n"
        'data: {"b": 2}\r\r'
        "data: [DONE]\n\n"
    )
    expected = ['{"a": 1}', "line one\nline two", '{"b": 2}', "[DONE]"]
    whole = SSEParser().feed(stream)
    assert whole == expected
    # Byte by byte (splitting every CRLF) and in uneven pieces give the same events.
    for size in (1, 2, 7):
        parser = SSEParser()
        events = [e for i in range(0, len(stream), size) for e in parser.feed(stream[i : i + size])]
        assert events == expected, size
    assert SSEParser().feed("data: incomplete") == []  # no blank line yet: not an event


def _result(ttft: float, e2e: float, tokens: int, itl: list[float], **kw: Any) -> RequestResult:
    r = RequestResult(index=0, expected_output_tokens=tokens, input_len=10, status="ok", **kw)
    r.ttft_s, r.e2e_s, r.output_tokens, r.itl_s, r.send_s = ttft, e2e, tokens, itl, 0.0
    return r


def test_percentiles_tpot_and_goodput() -> None:
    stats = distribution_ms([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert stats["mean"] == pytest.approx(50.5)
    assert stats["p50"] == pytest.approx(50.5)
    assert stats["p90"] == pytest.approx(90.1)
    assert stats["p99"] == pytest.approx(99.01)
    assert distribution_ms([]) == {"mean": None, "p50": None, "p90": None, "p99": None}

    fast = _result(0.1, 0.5, 5, [0.1] * 4)  # TPOT (0.5 - 0.1) / 4 = 100 ms
    slow_start = _result(0.4, 0.8, 5, [0.1] * 4)  # TTFT 400 ms
    slow_decode = _result(0.1, 1.3, 5, [0.3] * 4)  # TPOT 300 ms
    one_token = _result(0.1, 0.1, 1, [])  # no TPOT at all
    failed = RequestResult(4, 5, 10, status="failed", error="HTTP 500: boom")
    assert fast.tpot_s == pytest.approx(0.1)
    assert one_token.tpot_s is None
    assert [meets_slo(r, 200, 150) for r in (fast, slow_start, slow_decode, one_token, failed)] == [
        True,
        False,
        False,
        True,
        False,
    ]

    s = summarize([fast, slow_start, slow_decode, one_token, failed], 2.0, 200, 150)
    assert (s["requests"], s["completed"], s["failed"], s["cancelled"]) == (5, 4, 1, 0)
    assert s["request_throughput"] == pytest.approx(2.0)
    assert s["goodput"] == pytest.approx(1.0)  # 2 good requests in 2 s
    assert s["output_tokens"] == 16 and s["output_token_throughput"] == pytest.approx(8.0)
    assert s["total_token_throughput"] == pytest.approx((40 + 16) / 2)
    assert s["itl_ms"]["mean"] == pytest.approx(1000 * (0.1 * 8 + 0.3 * 4) / 12)
    assert s["tpot_ms"]["p50"] == pytest.approx(100)  # of 100, 100, 300 (one_token has none)
    assert s["errors"] == ["HTTP 500: boom"]
    assert summarize([fast], 1.0)["goodput"] is None  # no SLO given: no goodput


@needs_trace
def test_trace_rows_and_replay_times() -> None:
    rows = load_trace(CONV_TRACE)
    assert len(rows) == 19366
    assert [(r.context_tokens, r.generated_tokens) for r in rows[:3]] == [
        (374, 44),
        (396, 109),
        (879, 55),
    ]
    # 18:15:46.6805900, 18:15:50.9951690, 18:15:51.2224670
    assert [r.offset_s for r in rows[:3]] == pytest.approx([0.0, 4.314579, 4.541877])
    shapes = trace_shapes(rows[:3], time_scale=2.0)
    assert [s.arrival_s for s in shapes] == pytest.approx([0.0, 2.1572895, 2.2709385])
    window = load_trace(CONV_TRACE, offset_s=4.4, duration_s=1.0)  # 18:15:51.08 to 52.08
    assert [(r.context_tokens, r.generated_tokens) for r in window] == [(879, 55), (91, 16)]
    assert trace_shapes(window, 1.0)[1].arrival_s == pytest.approx(0.168550)


def test_synthetic_prompts_have_the_lengths_asked() -> None:
    shapes = poisson_shapes(50, 10.0, input_len=30, output_len=None, rng=random.Random(0))
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(shapes, shapes[1:], strict=False)]
    assert all(g > 0 for g in gaps) and 2 < shapes[-1].arrival_s < 10  # ~49 gaps of 0.1 s
    assert {s.arrival_s for s in poisson_shapes(3, float("inf"), 1, 1, random.Random(0))} == {0}
    maker = PromptMaker("random", "completions", random.Random(0))
    specs = build_requests(shapes, maker, default_output_len=7, max_input=20)
    assert all(len(s.prompt) == s.input_len == 20 for s in specs)  # capped at 20 token ids
    assert all(10 <= i < 256 for s in specs for i in s.prompt)
    assert {s.output_len for s in specs} == {7}


# ---- against the real server -----------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with running_server(max_num_waiting=256) as s:
        yield s


def _bench(server: ServerThread, tmp_path: Path, *flags: str) -> dict[str, Any]:
    """``parallm bench serve`` through the real command line parser; the JSON it wrote."""
    out = tmp_path / "result.json"
    argv = ["bench", "serve", "--base-url", server.url, "--api-key", API_KEY, "--out", str(out)]
    args = build_parser().parse_args([*argv, "--no-progress", *flags])
    payload = serve.run(args)
    assert json.loads(out.read_text())["summary"] == json.loads(json.dumps(payload["summary"]))
    return payload


def _check_report(payload: dict[str, Any], n: int) -> dict[str, Any]:
    s = payload["summary"]
    assert (s["requests"], s["completed"], s["failed"], s["cancelled"]) == (n, n, 0, 0), s
    assert s["errors"] == [] and s["short_outputs"] == 0
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        d = s[metric]
        assert 0 < d["p50"] <= d["p90"] <= d["p99"], (metric, d)
        assert d["mean"] > 0
    assert s["ttft_ms"]["p50"] <= s["e2e_ms"]["p50"]
    assert 0 <= s["goodput"] <= s["request_throughput"]
    assert s["output_token_throughput"] < s["total_token_throughput"]
    reqs = payload["requests"]
    assert len(reqs) == n
    assert sum(r["output_tokens"] for r in reqs) == s["output_tokens"]
    assert all(r["output_tokens"] == r["expected_output_tokens"] for r in reqs)
    return s


@needs_trace
def test_replay_azure_conversation_trace(server: ServerThread, tmp_path: Path) -> None:
    # The first 20 requests of the trace span 13 s: replayed 5x faster, they arrive in ~2.7 s.
    # Lengths are capped to keep the CPU work small (the test model's context is 256).
    png = tmp_path / "latency.png"
    payload = _bench(
        server, tmp_path, "--trace", str(CONV_TRACE), "--time-scale", "5", "--num-requests", "20",
        "--max-input-tokens", "64", "--max-output-tokens", "8", "--tokenizer",
        str(tiny_model_path()), "--slo-ttft-ms", "1000", "--slo-tpot-ms", "500", "--plot",
        str(png), "--prompts", "random",
    )  # fmt: skip
    s = _check_report(payload, 20)
    assert payload["model"] == MODEL_NAME  # found through /v1/models
    assert s["duration_s"] > 2.5  # the replay kept the trace's pacing
    reqs = payload["requests"]
    assert [r["expected_output_tokens"] for r in reqs[:3]] == [8, 8, 8]
    assert [r["prompt_tokens"] for r in reqs[:4]] == [64, 64, 64, 64]  # token ids are exact
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_poisson_chat_with_sonnet_prompts(server: ServerThread, tmp_path: Path) -> None:
    payload = _bench(
        server, tmp_path, "--endpoint", "chat", "--model", MODEL_NAME, "--request-rate", "20",
        "--num-requests", "12", "--input-len", "40", "--output-len", "6", "--max-concurrency",
        "4", "--slo-ttft-ms", "5000", "--slo-tpot-ms", "5000",
    )  # fmt: skip
    s = _check_report(payload, 12)
    assert s["goodput"] == pytest.approx(s["request_throughput"])  # generous SLOs: all good


def test_failures_and_the_time_limit(server: ServerThread, tmp_path: Path) -> None:
    bad = _bench(server, tmp_path, "--model", "no-such-model", "--num-requests", "3",
                 "--input-len", "8", "--output-len", "2")  # fmt: skip
    s = bad["summary"]
    assert (s["completed"], s["failed"]) == (0, 3)
    assert len(s["errors"]) == 1 and "HTTP 4" in s["errors"][0]
    assert "no-such-model" in s["errors"][0]

    # At 0.2 requests/s the second arrival (seed 0) is seconds away: the 1 s limit cancels it.
    cut = _bench(server, tmp_path, "--request-rate", "0.2", "--num-requests", "3",
                 "--input-len", "8", "--output-len", "2", "--max-duration-s", "1")  # fmt: skip
    s = cut["summary"]
    assert (s["completed"], s["cancelled"]) == (1, 2)
    assert s["duration_s"] < 1.5
