"""benchmarks/peers/serve_profile.py: the device's busy and idle time read from a trace, and a
server profiled under a replayed load through /start_profile and /stop_profile."""

from __future__ import annotations

import gzip
import json
import sys

import pytest
from benchmark_module import load_benchmark
from server_support import running_server

from parallm.config import EngineConfig


@pytest.fixture(scope="module")
def serve_profile():
    return load_benchmark("peers/serve_profile")


def _kernel(name: str, ts: float, dur: float, cat: str = "kernel") -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_busy_time_is_the_union_and_idle_gaps_fall_in_their_bands(serve_profile):
    events = [
        _kernel("gemm", 0.0, 50.0),
        _kernel("norm", 20.0, 10.0),  # inside gemm: adds no busy time
        _kernel("gemm", 55.0, 45.0),  # a 5 µs gap
        _kernel("copy", 150.0, 50.0, cat="gpu_memcpy"),  # a 50 µs gap
        _kernel("gemm", 1400.0, 100.0),  # a 1,200 µs gap
    ]
    s = serve_profile.kernel_summary(events)
    assert s["span_us"] == 1500.0 and s["busy_us"] == 50.0 + 45.0 + 50.0 + 100.0
    assert s["busy_share"] == pytest.approx(245.0 / 1500.0)
    assert s["idle_us_by_gap"] == {"0-10us": 5.0, "10-100us": 50.0, "100-1000us": 0.0,
                                   ">1000us": 1200.0}  # fmt: skip
    assert s["busy_us"] + sum(s["idle_us_by_gap"].values()) == s["span_us"]
    assert [(k["name"], k["total_us"], k["count"]) for k in s["kernels"]] == [
        ("gemm", 195.0, 3), ("copy", 50.0, 1), ("norm", 10.0, 1)]  # fmt: skip
    table = serve_profile.per_step_table({"x": {"summary": s, "steps": 5}})
    assert "| x | 0.00 | 5 | - | 16.3% | 0.05 | 0.25 (0.24) |" in table
    table = serve_profile.per_step_table(
        {"x": {"summary": s, "steps": 5, "tokens_per_step": 96.25}}
    )
    assert "| x | 0.00 | 5 | 96.2 | 16.3% |" in table
    assert serve_profile.kernel_summary([])["busy_share"] == 0.0


def test_steps_are_grouped_by_shape_from_their_named_ranges(serve_profile):
    def step(ctx: int, ctx_tokens: int, gen: int, ts: float, dur: float) -> dict:
        name = f"execute_context_{ctx}({ctx_tokens})_generation_{gen}({gen})"
        return _kernel(name, ts, dur, cat="gpu_user_annotation")

    events = [
        step(0, 0, 97, 0.0, 11_000.0), step(0, 0, 112, 20_000.0, 13_000.0),  # one band
        step(0, 0, 113, 40_000.0, 14_000.0), step(0, 0, 1, 60_000.0, 6_000.0),
        step(1, 900, 80, 70_000.0, 30_000.0), step(2, 3000, 60, 100_000.0, 90_000.0),
        _kernel("execute_context_0(0)_generation_5(5)", 0.0, 1.0, cat="user_annotation"),  # host
        _kernel("gemm", 0.0, 9_000.0),
    ]  # fmt: skip
    shapes = serve_profile.step_shapes(events)
    assert shapes["decode"] == {
        "1-16": {"steps": 1, "ms": 6.0, "decoding": 1.0},
        "97-112": {"steps": 2, "ms": 12.0, "decoding": 104.5},
        "113-128": {"steps": 1, "ms": 14.0, "decoding": 113.0},
    }
    assert shapes["prompt"] == {"<=1024": {"steps": 1, "ms": 30.0, "decoding": 80.0},
                                "<=4096": {"steps": 1, "ms": 90.0, "decoding": 60.0}}  # fmt: skip
    # The ranges are not device work of their own: only the kernel is busy time.
    assert serve_profile.kernel_summary(events)["busy_us"] == 9_000.0
    row = {"summary": serve_profile.kernel_summary(events), "step_shapes": shapes}
    table = serve_profile.step_shape_table(
        {
            "a": row,
            "b": {
                **row,
                "step_shapes": {
                    "decode": {"97-112": {"steps": 3, "ms": 10.0, "decoding": 100.0}},
                    "prompt": {},
                },
            },
        }
    )
    assert "| 97-112 | 2 x 12.00 ms | 3 x 10.00 ms |" in table
    assert "| 1-16 | 1 x 6.00 ms | - |" in table
    assert "| <=1024 | 1 x 30.00 ms, 80 decoding | - |" in table
    assert serve_profile.step_shape_table({"a": {"summary": row["summary"]}}) == ""


def test_the_trace_with_device_activity_is_picked(serve_profile, tmp_path):
    def write(name: str, events: list[dict]) -> None:
        with gzip.open(tmp_path / name, "wt") as f:
            json.dump({"traceEvents": events}, f)

    write("api.1.pt.trace.json.gz", [{"ph": "X", "cat": "cpu_op", "name": "x", "ts": 0, "dur": 1}])
    write("core.2.pt.trace.json.gz", [_kernel("k", 0.0, 1.0), _kernel("k", 2.0, 1.0)])
    trace, events = serve_profile.device_trace(tmp_path)
    assert trace.name == "core.2.pt.trace.json.gz" and [e["ts"] for e in events] == [0.0, 2.0]
    assert serve_profile.device_trace(tmp_path / "missing") is None


def test_the_profiler_flag_is_one_each_server_takes(serve_profile, tmp_path):
    flag, value = serve_profile.profiler_flags(tmp_path, vllm=False)
    assert flag == "--profiler-config"
    config = EngineConfig(profiler_config=value).profiler_config
    assert config.enabled and config.torch_profiler_dir == str(tmp_path)
    # vLLM's own key, which parallm (no API-process profile to leave out) would refuse.
    _, theirs = serve_profile.profiler_flags(tmp_path, vllm=True)
    assert json.loads(theirs) == {**json.loads(value), "ignore_frontend": True}


def test_a_server_profiled_under_a_replayed_load(serve_profile, tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                     + "".join(f"2023-11-16 18:15:{46 + i}.0,20,16\n" for i in range(6)))  # fmt: skip
    folder = tmp_path / "profiles"
    config = {"profiler": "torch", "torch_profiler_dir": str(folder)}
    scrapes = []
    with running_server(api_key=None, profiler_config=config) as server:
        load = [sys.executable, "-m", "parallm.cli", "bench", "serve", "--base-url", server.url,
                "--dataset-name", "trace", "--dataset-path", str(trace), "--time-scale", "1",
                "--max-input-tokens", "64", "--no-progress", "--out", str(tmp_path / "b.json")]  # fmt: skip
        ok, before, after = serve_profile.profiled_load(
            load, int(server.url.rsplit(":", 1)[1]), 1.0, 2.0, tmp_path / "load.log",
            lambda: scrapes.append(1) or len(scrapes),
        )  # fmt: skip
    assert ok, (tmp_path / "load.log").read_text()
    assert (before, after) == (1, 2)
    (written,) = folder.glob("*.pt.trace.json.gz")
    with gzip.open(written, "rt") as f:
        names = {e.get("name", "") for e in json.load(f)["traceEvents"]}
    assert any(n.startswith("aten::") for n in names)  # steps ran inside the window
    assert json.loads((tmp_path / "b.json").read_text())["summary"]["completed"] == 6
