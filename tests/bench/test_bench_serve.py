"""``parallm bench serve``: the SSE parser, the statistics, trace parsing, the flags (vLLM's
spellings and ours), and full runs against the real server with a tiny model (the default
random dataset, random chat, and with ../shared: the Azure conversation trace and sonnet text).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from server_support import API_KEY, MODEL_NAME, running_server, tiny_model_path

from parallm.bench import serve, serve_client, serve_report
from parallm.bench.serve_client import (
    ClientConfig,
    RequestResult,
    SSEParser,
    client_session,
    request_body,
    stream_one,
)
from parallm.bench.serve_report import distribution_ms, meets_slo, summarize
from parallm.bench.serve_workload import (
    PromptMaker,
    RequestSpec,
    arrival_times,
    build_requests,
    load_trace,
    random_lengths,
    synthetic_shapes,
    trace_shapes,
)
from parallm.cli import build_parser, main
from parallm.server.launcher import ServerThread

# The project's shared data sits beside the clone (../shared); a fresh clone has none, and the
# tests that need it skip. PARALLM_SHARED_DIR points elsewhere (a missing folder hides it).
SHARED = Path(os.environ.get("PARALLM_SHARED_DIR", Path(__file__).resolve().parents[3] / "shared"))
CONV_TRACE = SHARED / "traces" / "AzureLLMInferenceTrace_conv.csv"
SONNET = SHARED / "prompts" / "llmperf_sonnet.txt"
needs_trace = pytest.mark.skipif(
    not CONV_TRACE.exists(), reason=f"no Azure conversation trace at {CONV_TRACE}"
)
needs_sonnet = pytest.mark.skipif(not SONNET.exists(), reason=f"no sonnet text at {SONNET}")


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


def test_stream_text_split_inside_a_character(monkeypatch) -> None:
    """A chunk boundary inside a UTF-8 character (the server's writes split anywhere) loses
    nothing: the text arrives whole, and the stream's usage gives the token count."""
    texts: list[str] = []
    on_chunk = serve_client._Timer.on_chunk

    def recording(self, chunk: dict[str, Any], now: float) -> None:
        texts.extend(c.get("text", "") for c in chunk.get("choices", []))
        on_chunk(self, chunk, now)

    monkeypatch.setattr(serve_client._Timer, "on_chunk", recording)
    event = 'data: {"choices": [{"text": "\u00e9t\u00e9"}]}\n\n'.encode()  # two-byte é
    usage = b'data: {"choices": [], "usage": {"completion_tokens": 2}}\n\ndata: [DONE]\n\n'
    cut = event.index(b"\xc3") + 1  # between the two bytes of the first character

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
        )
        for piece in (event[:cut], event[cut:] + usage):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.05)  # so the client reads the pieces apart
        writer.close()

    async def scenario() -> RequestResult:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        cfg = ClientConfig(f"http://127.0.0.1:{port}/v1", "m")
        result = RequestResult(0, 2, 3)
        async with server, client_session(cfg) as session:
            await stream_one(session, cfg, RequestSpec(0, 0.0, [1, 2, 3], 3, 2), result)
        return result

    result = asyncio.run(scenario())
    assert texts == ["\u00e9t\u00e9"]
    assert result.output_tokens == 2 and result.ttft_s is not None and result.e2e_s is not None


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
    shapes = synthetic_shapes(50, 10.0, input_len=30, output_len=None, rng=random.Random(0))
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(shapes, shapes[1:], strict=False)]
    assert all(g > 0 for g in gaps) and 2 < shapes[-1].arrival_s < 10  # ~49 gaps of 0.1 s
    assert {s.arrival_s for s in synthetic_shapes(3, float("inf"), 1, 1, random.Random(0))} == {0}
    maker = PromptMaker("random", "completions", random.Random(0))
    specs = build_requests(shapes, maker, default_output_len=7, max_input=20)
    assert all(len(s.prompt) == s.input_len == 20 for s in specs)  # capped at 20 token ids
    assert all(10 <= i < 256 for s in specs for i in s.prompt)
    assert {s.output_len for s in specs} == {7}


def test_burstiness_shapes_the_gaps_around_the_same_rate() -> None:
    # Gamma gaps of shape k and mean 1/rate have a coefficient of variation 1/sqrt(k): k = 1 is
    # Poisson (CV 1), k = 0.25 bursty (CV 2), k = 16 nearly even (CV 0.25).
    for burstiness in (0.25, 1.0, 16.0):
        times = arrival_times(4000, 50.0, burstiness, random.Random(1))
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        assert statistics.fmean(gaps) == pytest.approx(1 / 50, rel=0.1), burstiness
        cv = statistics.pstdev(gaps) / statistics.fmean(gaps)
        assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.1), burstiness
    with pytest.raises(ValueError, match="--burstiness must be positive"):
        arrival_times(3, 1.0, 0.0, random.Random(0))


def test_detailed_rows_hold_each_requests_gaps() -> None:
    done = serve_client.RequestResult(index=0, expected_output_tokens=3, input_len=5,
                                      status="ok", itl_s=[0.0123456789, 0.02])  # fmt: skip
    failed = serve_client.RequestResult(index=1, expected_output_tokens=3, input_len=5)
    plain = serve_report.per_request([done, failed])
    assert [set(row) for row in plain] == [set(plain[0])] * 2 and "itl_s" not in plain[0]
    detailed = serve_report.per_request([done, failed], detailed=True)
    assert [row["itl_s"] for row in detailed] == [[0.012346, 0.02], []]
    assert [{k: v for k, v in row.items() if k != "itl_s"} for row in detailed] == plain


def test_random_range_ratio_spreads_lengths() -> None:
    assert set(random_lengths(50, 100, 0.0, random.Random(0))) == {100}
    lengths = random_lengths(2000, 100, 0.25, random.Random(0))
    assert min(lengths) == 75 and max(lengths) == 125  # both ends drawn
    assert statistics.fmean(lengths) == pytest.approx(100, rel=0.02)
    assert min(random_lengths(200, 2, 0.9, random.Random(0))) == 1  # never below one token
    with pytest.raises(ValueError, match=r"--random-range-ratio must be in \[0, 1\)"):
        random_lengths(3, 100, 1.0, random.Random(0))


def _serve_args(*flags: str) -> Any:
    return build_parser().parse_args(["bench", "serve", "--base-url", "http://x", *flags])


def test_vllm_flag_spellings_and_the_old_ones() -> None:
    args = _serve_args(
        "--num-prompts", "7", "--dataset-name", "random", "--random-input-len", "33",
        "--random-output-len", "5", "--random-range-ratio", "0.5", "--burstiness", "0.5",
        "--goodput", "ttft:500", "tpot:50", "e2el:3000", "--percentile-metrics", "ttft,e2el",
        "--metric-percentiles", "25,99.9", "--save-result", "--result-dir", "out",
    )  # fmt: skip
    assert (args.num_prompts, args.dataset_name, args.random_input_len) == (7, "random", 33)
    assert (args.random_output_len, args.random_range_ratio, args.burstiness) == (5, 0.5, 0.5)
    assert serve.slo_limits(args) == {"ttft": 500.0, "tpot": 50.0, "e2e": 3000.0}
    assert args.percentile_metrics == ("ttft", "e2e")
    assert args.metric_percentiles == (25.0, 99.9)
    assert args.save_result and args.result_dir == Path("out")
    # Defaults: vLLM's random lengths, our three percentiles of all four metrics.
    default = _serve_args()
    assert (default.dataset_name, default.num_prompts) == ("random", 1000)
    assert (default.random_input_len, default.random_output_len) == (1024, 128)
    assert default.percentile_metrics == ("ttft", "tpot", "itl", "e2e")
    assert default.metric_percentiles == (50, 90, 99)
    assert not default.save_result and serve.slo_limits(default) == dict.fromkeys(
        ("ttft", "tpot", "e2e")
    )
    old = _serve_args(
        "--num-requests", "3", "--input-len", "9", "--output-len", "2", "--prompts", "sonnet",
        "--prompts-file", "s.txt", "--slo-ttft-ms", "400", "--slo-tpot-ms", "40",
    )  # fmt: skip
    assert (old.num_prompts, old.random_input_len, old.random_output_len) == (3, 9, 2)
    assert (old.dataset_name, old.dataset_path) == ("sonnet", Path("s.txt"))
    assert serve.slo_limits(old) == {"ttft": 400.0, "tpot": 40.0, "e2e": None}
    with pytest.raises(ValueError, match="disagree"):
        serve.slo_limits(_serve_args("--goodput", "ttft:500", "--slo-ttft-ms", "400"))


def test_requests_are_greedy_unless_a_temperature_is_given() -> None:
    """As the offline benchmarks and vLLM's bench serve: temperature 0 unless --temperature
    says otherwise (a server's own default, 1.0 in OpenAI's API, would measure sampling)."""
    spec = RequestSpec(index=0, arrival_s=0.0, prompt=[1, 2, 3], input_len=3, output_len=5)
    for flags, want in [([], 0.0), (["--temperature", "0.7"], 0.7)]:
        args = _serve_args(*flags)
        cfg = ClientConfig(base_url="http://x/v1", model="m", temperature=args.temperature)
        assert request_body(cfg, spec)["temperature"] == want
    unset = ClientConfig(base_url="http://x/v1", model="m", temperature=None)
    assert "temperature" not in request_body(unset, spec)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--goodput", "ttfb:5"], "METRIC one of ttft, tpot, e2el"),
        (["--goodput", "ttft:-1"], "positive number of ms"),
        (["--percentile-metrics", "ttft,latency"], "from ttft, tpot, itl, e2el"),
        (["--metric-percentiles", "50,101"], "percentiles in [0, 100]"),
        (["--dataset-name", "hf"], "invalid choice: 'hf'"),
        (["--temperature", "-0.5"], "a temperature >= 0"),
        (["--temperature", "warm"], "a temperature >= 0"),
    ],
)
def test_bad_flag_values_name_the_flag(flags: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _serve_args(*flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: parallm bench serve")
    assert f"parallm bench serve: error: argument {flags[0]}" in err and message in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--trace", "{missing}"], "the trace {missing}: no such file"),
        (["--dataset-name", "trace", "--dataset-path", "{missing}"], "no such file"),
        (["--dataset-name", "sonnet", "--prompts-file", "{missing}"], "no such file"),
        (["--dataset-name", "sharegpt"], "--dataset-name sharegpt needs --dataset-path"),
        (["--dataset-name", "trace"], "--dataset-name trace needs --dataset-path"),
        (["--dataset-path", "{missing}"], "not used by --dataset-name random"),
        (["--endpoint", "chat"], "random prompts for --endpoint chat need --tokenizer"),
    ],
)
def test_bad_datasets_are_one_line_errors(flags, message, tmp_path, capsys) -> None:
    # Nothing listens on the URL: the dataset is checked before any request is sent.
    missing = str(tmp_path / "missing.csv")
    flags = [f.format(missing=missing) for f in flags]
    argv = ["bench", "serve", "--base-url", "http://127.0.0.1:9", "--no-progress", *flags]
    assert main(argv) == 2
    out = capsys.readouterr()
    assert out.err.count("\n") == 1 and out.err.startswith("parallm bench serve: error: ")
    assert message.format(missing=missing) in out.err
    assert out.out == ""


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


def _check_report(
    payload: dict[str, Any],
    n: int,
    metrics: tuple[str, ...] = ("ttft", "tpot", "itl", "e2e"),
    percentiles: tuple[str, ...] = ("p50", "p90", "p99"),
) -> dict[str, Any]:
    s = payload["summary"]
    assert (s["requests"], s["completed"], s["failed"], s["cancelled"]) == (n, n, 0, 0), s
    assert s["errors"] == [] and s["short_outputs"] == 0
    assert [k.removesuffix("_ms") for k in s if k.endswith("_ms") and isinstance(s[k], dict)] == [
        *metrics
    ]
    for metric in metrics:
        d = s[f"{metric}_ms"]
        assert list(d) == ["mean", *percentiles]
        values = [d[p] for p in percentiles]
        assert values[0] > 0 and values == sorted(values), (metric, d)
        assert d["mean"] > 0
    assert s["ttft_ms"]["mean"] <= s["e2e_ms"]["mean"]
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


def test_default_random_dataset_needs_no_file(server: ServerThread, tmp_path: Path, capsys) -> None:
    """No dataset flag: random token-id prompts of the requested lengths, and vLLM's report
    and result flags."""
    results = tmp_path / "results"
    payload = _bench(
        server, tmp_path, "--num-prompts", "6", "--random-input-len", "24",
        "--random-output-len", "4", "--goodput", "ttft:5000", "e2el:20000",
        "--percentile-metrics", "ttft,e2el", "--metric-percentiles", "50,99.5",
        "--save-result", "--result-dir", str(results), "--save-detailed",
    )  # fmt: skip
    s = _check_report(payload, 6, metrics=("ttft", "e2e"), percentiles=("p50", "p99.5"))
    reqs = payload["requests"]
    assert [r["prompt_tokens"] for r in reqs] == [24] * 6  # token ids: exact lengths
    assert [r["output_tokens"] for r in reqs] == [4] * 6
    for r in reqs:  # --save-detailed: a gap before each chunk with text but the first
        assert len(r["itl_s"]) <= 3 and all(gap >= 0 for gap in r["itl_s"]), r
        assert r["ttft_s"] + sum(r["itl_s"]) <= r["e2e_s"] + 1e-5
    assert (s["slo_ttft_ms"], s["slo_tpot_ms"], s["slo_e2e_ms"]) == (5000, None, 20000)
    assert s["goodput"] == pytest.approx(s["request_throughput"])  # generous SLOs: all good
    (saved,) = results.iterdir()
    assert re.fullmatch(rf"completions-infqps-{MODEL_NAME}-\d{{8}}-\d{{6}}\.json", saved.name)
    assert json.loads(saved.read_text())["summary"] == json.loads(json.dumps(s))
    report = capsys.readouterr().out
    assert "p99.5" in report and "TPOT" not in report and "E2E" in report
    assert "meeting TTFT <= 5000 ms, E2E <= 20000 ms" in report


def test_bursty_random_chat_with_a_tokenizer(server: ServerThread, tmp_path: Path) -> None:
    # Chat takes text: the random ids are decoded with the tokenizer given.
    payload = _bench(
        server, tmp_path, "--endpoint", "chat", "--model", MODEL_NAME, "--request-rate", "20",
        "--burstiness", "0.5", "--num-prompts", "8", "--random-input-len", "30",
        "--random-output-len", "5", "--random-range-ratio", "0.5", "--max-concurrency", "4",
        "--tokenizer", str(tiny_model_path()), "--slo-ttft-ms", "5000", "--slo-tpot-ms", "5000",
    )  # fmt: skip
    s = _check_report(payload, 8)
    assert not any("itl_s" in r for r in payload["requests"])  # only with --save-detailed
    outputs = [r["output_tokens"] for r in payload["requests"]]
    assert all(3 <= n <= 8 for n in outputs) and len(set(outputs)) > 1  # 5 +- 50%
    assert s["goodput"] == pytest.approx(s["request_throughput"])


@needs_sonnet
def test_poisson_chat_with_sonnet_prompts(server: ServerThread, tmp_path: Path) -> None:
    payload = _bench(
        server, tmp_path, "--endpoint", "chat", "--model", MODEL_NAME, "--request-rate", "20",
        "--num-requests", "12", "--input-len", "40", "--output-len", "6", "--max-concurrency",
        "4", "--slo-ttft-ms", "5000", "--slo-tpot-ms", "5000", "--dataset-name", "sonnet",
        "--dataset-path", str(SONNET),
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
