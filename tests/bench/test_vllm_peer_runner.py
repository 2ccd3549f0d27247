"""benchmarks/peers/run_vllm.py, the GPU machine's side-by-side runner, on CPU: its flags, the
server commands it builds, the serving step end to end against parallm's own server on a tiny
model (vLLM's server is not here), the summary, and that stopping a server stops its whole
process group. Plumbing only: no figure here says anything about speed."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from benchmark_module import load_benchmark
from trace_files import write_trace

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_vllm():
    return load_benchmark("peers/run_vllm")


def _dead(pid: int) -> bool:
    """Gone, or a zombie waiting for whoever inherited it to reap it."""
    for _ in range(50):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_flags_are_checked_before_anything_runs(run_vllm, tmp_path, capsys):
    for argv, message in (
        (["--steps", "offline,train"], "--steps: unknown train"),
        (["--models", "llama-9t"], "--models: no benchmarks/configs/llama-9t.json"),
        (["--servers", "sglang"], "--servers: unknown sglang"),
        (["--trace", str(tmp_path / "none.csv")], "no such file"),
        (["--mixed-arrival-lens", "512,0"], "--mixed-arrival-lens: expected positive integers"),
        (["--mixed-batch-sizes", "a"], "--mixed-batch-sizes: expected positive integers"),
        (["--profile-at", "1"], "--profile-at: expected a share of the arrivals from 0"),
        (["--profile-at", "-0.1"], "--profile-at: expected a share of the arrivals from 0"),
    ):
        with pytest.raises(SystemExit):
            run_vllm.parse_args(argv)
        assert message in capsys.readouterr().err
    args = run_vllm.parse_args(["--models", "qwen3-0.6b,llama-3.1-8b", "--steps", "latency"])
    assert args.models == ["qwen3-0.6b", "llama-3.1-8b"] and args.steps == ["latency"]


def test_server_commands_differ_only_where_the_configurations_do(run_vllm, tmp_path):
    args = run_vllm.parse_args(["--steps", "latency", "--port", "8123"])
    limits = run_vllm.parallm_limits(args)
    assert limits == {"max-num-seqs": 256, "max-num-batched-tokens": 8192, "block-size": 16,
                      "gpu-memory-utilization": 0.9}  # fmt: skip
    ours = run_vllm.server_command("parallm", tmp_path, args, limits)
    defaults = run_vllm.server_command("vllm-stock", tmp_path, args, limits)
    limited = run_vllm.server_command("vllm-parallm-limits", tmp_path, args, limits)
    assert ours[1:5] == ["-m", "parallm.cli", "serve", "--model"]
    assert defaults[1:5] == ["-m", "vllm.entrypoints.cli.main", "serve", str(tmp_path)]
    shared = ["--load-format", "dummy", "--dtype", "bfloat16", "--max-model-len", "4096",
              "--port", "8123", "--served-model-name", "peer", "--seed", "0"]  # fmt: skip
    assert ours[-len(shared) :] == shared and defaults[-len(shared) :] == shared
    assert limited[: len(defaults)] == defaults
    assert limited[len(defaults) :] == ["--max-num-seqs", "256", "--max-num-batched-tokens",
                                        "8192", "--block-size", "16",
                                        "--gpu-memory-utilization", "0.9"]  # fmt: skip
    peer = run_vllm.vllm_server_limits(80 * 2**30, "NVIDIA H100 80GB HBM3")
    assert peer == {"max-num-seqs": 1024, "max-num-batched-tokens": 8192}
    admitted = run_vllm.server_command("parallm-vllm-limits", tmp_path, args, limits, peer)
    assert admitted == ours + ["--max-num-seqs", "1024", "--max-num-batched-tokens", "8192"]


def test_vllm_server_limits_follow_the_gpu(run_vllm):
    # vLLM 0.26.0's EngineArgs: large defaults from 70 GiB up, except on A100s.
    for memory, name, want in ((141 * 2**30, "NVIDIA H200", (1024, 8192)),
                               (80 * 2**30, "NVIDIA A100-SXM4-80GB", (256, 2048)),
                               (48 * 2**30, "NVIDIA L40S", (256, 2048))):  # fmt: skip
        limits = run_vllm.vllm_server_limits(memory, name)
        assert (limits["max-num-seqs"], limits["max-num-batched-tokens"]) == want, name


def test_serving_step_end_to_end_against_parallm(run_vllm, tiny_model_dir, tmp_path,
                                                  monkeypatch):  # fmt: skip
    """A trace replayed against `parallm serve` on a tiny shape: the server gets a folder with
    the config and the id tokenizer, the bench's JSON lands in the summary and the tar.gz,
    and the server is gone afterwards."""
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "tiny.json").write_text((tiny_model_dir("llama3") / "config.json").read_text())
    monkeypatch.setattr(run_vllm, "CONFIGS", configs)
    trace = tmp_path / "trace.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.0,20,8\n"
                     "2023-11-16 18:15:46.5,30,6\n2023-11-16 18:15:47.0,12,5\n")  # fmt: skip
    port = _free_port()
    work, out = tmp_path / "work", tmp_path / "out"
    code = run_vllm.main(["--models", "tiny", "--steps", "serve", "--servers", "parallm",
                          "--trace", str(trace), "--time-scales", "4", "--max-model-len", "256",
                          "--max-input-tokens", "100", "--port", str(port), "--work", str(work),
                          "--out", str(out), "--start-timeout-s", "120"])  # fmt: skip
    assert code == 0
    folder = work / "models" / "tiny"
    assert {"config.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    row = summary["serve"]["tiny_parallm_x4"]
    assert row["completed"] == 3 and row["failed"] == 0 and row["ttft_p50"] > 0
    # The engine's counters over the measured load only (the warm-up's steps not among them):
    # every step computes at least one token, and the 3 requests' prompts and outputs are
    # at most 62 + 19 tokens (the id tokenizer may add a BOS to each prompt).
    counters = json.loads((work / "counters_serve_tiny_parallm_x4.json").read_text())
    assert 0 < counters["steps"] <= counters["step_tokens"] <= 62 + 3 + 19
    assert counters["generation_tokens"] == 19 and sum(counters["steps_by_tokens"].values()) == (
        counters["steps"])  # fmt: skip
    assert row["steps"] == counters["steps"] and row["ms_per_step"] > 0
    # The warm-up load ran first on the same server and is not a row of the summary.
    warmup = json.loads((work / "warmup_serve_tiny_parallm.json").read_text())
    assert warmup["summary"]["completed"] == 3
    assert list(summary["serve"]) == ["tiny_parallm_x4"]
    assert "| tiny_parallm_x4 |" in (out / "summary.md").read_text()
    (packed,) = out.glob("peers-*.tar.gz")
    with tarfile.open(packed) as tar:
        assert any(n.endswith("serve_tiny_parallm_x4.json") for n in tar.getnames())
    with socket.socket() as s:  # nothing listens on the port any more (TIME_WAIT may linger)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_summary_puts_engines_side_by_side(run_vllm, tmp_path):
    rows = [{"engine": "parallm", "output_tokens_per_s": 1000.0},
            {"engine": "vllm 0.26.0 (stock)", "output_tokens_per_s": 800.0}]  # fmt: skip
    (tmp_path / "throughput_m.json").write_text(json.dumps({"results": rows}))
    lat = [{"engine": e, "batch_size": b, "ms_per_token": ms}
           for e, ms in (("parallm", 1.0), ("vllm 0.26.0 (stock)", 1.25)) for b in (1, 8)]  # fmt: skip
    (tmp_path / "latency_m.json").write_text(json.dumps({"results": lat}))
    summary = run_vllm.summarize(tmp_path)
    assert summary["offline"]["m"] == {"parallm": 1000.0, "vllm 0.26.0 (stock)": 800.0}
    assert summary["latency"]["m"]["vllm 0.26.0 (stock)"] == {"1": 1.25, "8": 1.25}
    table = run_vllm.markdown(summary)
    assert "| m | parallm | 1000 | 1.000 | 1.000 | - | - |" in table
    assert "| m | vllm 0.26.0 (stock) | 800 | 1.250 | 1.250 | - | - |" in table


def test_detailed_serving_runs_add_their_stalls(run_vllm, tmp_path):
    """Serving JSONs with each request's gaps (``--save-detailed``) get a row of stall events:
    here one 60 ms step that held up both requests, and a 30 ms gap of one."""
    pct = {"p50": 1.0, "p90": 2.0, "p99": 3.0}
    s = {"ttft_ms": pct, "tpot_ms": pct, "itl_ms": pct, "goodput": 1.0, "completed": 2,
         "failed": 0, "output_token_throughput": 9.0}  # fmt: skip
    requests = [
        {"status": "ok", "send_s": 0.0, "ttft_s": 0.1, "itl_s": [0.01, 0.06, 0.03]},
        {"status": "ok", "send_s": 0.0, "ttft_s": 0.1005, "itl_s": [0.01, 0.06, 0.01]},
    ]
    (tmp_path / "serve_m_parallm_x4.json").write_text(
        json.dumps({"summary": s, "requests": requests}))  # fmt: skip
    (tmp_path / "serve_m_vllm-stock_x4.json").write_text(
        json.dumps({"summary": s, "requests": [{"status": "ok", "send_s": 0.0, "ttft_s": 0.1}]})
    )
    summary = run_vllm.summarize(tmp_path)
    assert list(summary["stalls"]) == ["m_parallm_x4"]  # the run without gaps has no row
    table = run_vllm.markdown(summary)
    for row in ("| | serve_m_parallm_x4 |", "| stall events (gaps >= 25 ms) | 2 |",
                "| events a second | 22.22 |", "| event gap p50 / p90 ms | 45.0 / 57.0 |",
                "| requests held up an event | 1.5 |",
                "| gaps 25-50 ms (share of ITL time) | 1 (17%) |",
                "| gaps >= 50 ms (share of ITL time) | 2 (67%) |"):  # fmt: skip
        assert row in table, (row, table)


def test_profiles_of_both_servers_close_the_summary(run_vllm, tmp_path):
    summary = {"span_us": 2e6, "busy_us": 1.5e6, "busy_share": 0.75, "num_events": 9,
               "idle_us_by_gap": {"0-10us": 1e5, "10-100us": 1e5, "100-1000us": 1e5,
                                  ">1000us": 2e5},
               "kernels": [{"name": "gemm", "total_us": 1e6, "count": 800}]}  # fmt: skip
    for server, steps in (("parallm", 100), ("vllm-stock", 125)):
        row = {"summary": summary, "steps": steps, "tokens_per_step": 2.0 * steps, "trace": "t"}
        (tmp_path / f"profile_serve_m_{server}.json").write_text(json.dumps(row))
    table = run_vllm.markdown(run_vllm.summarize(tmp_path))
    assert "| m_parallm | 2.00 | 100 | 200.0 | 75.0% | 15.00 | 5.00 (3.00) |" in table
    assert "| m_vllm-stock | 2.00 | 125 | 250.0 | 75.0% | 12.00 | 4.00 (2.40) |" in table
    assert "  10.000     8.0x  gemm" in table


def test_stopping_a_server_stops_its_process_group(run_vllm, tmp_path):
    """vLLM's server starts an engine-core process; stopping the server must end it too."""
    child_pid = tmp_path / "child.pid"
    script = ("import subprocess, sys, time\n"
              "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
              f"open({str(child_pid)!r}, 'w').write(str(c.pid))\n"
              "time.sleep(120)\n")  # fmt: skip
    proc = run_vllm.start_server([sys.executable, "-c", script], tmp_path / "server.log")
    for _ in range(100):
        if child_pid.exists() and child_pid.read_text():
            break
        subprocess.run(["sleep", "0.1"])
    pid = int(child_pid.read_text())
    run_vllm.stop_group(proc, grace_s=5)
    assert proc.poll() is not None
    assert _dead(pid)


def test_a_failed_step_stops_the_run_and_still_packs(run_vllm, tmp_path, monkeypatch, capsys):
    """Without vLLM the first step fails at once (before any engine starts); the run stops
    there unless --keep-going, and the summaries and the tar.gz are written all the same."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the child finds parallm, and no vllm
    out = tmp_path / "out"
    code = run_vllm.main(["--models", "qwen3-0.6b", "--steps", "latency,offline",
                          "--work", str(tmp_path / "work"), "--out", str(out)])  # fmt: skip
    assert code == 1
    printed = capsys.readouterr().out
    assert "no module named 'vllm'" in printed
    assert "stopping after a failed step" in printed and "== throughput_" not in printed
    assert (out / "summary.json").is_file() and list(out.glob("peers-*.tar.gz"))


def test_mixed_step_runs_the_bench_in_both_engines_with_flags_it_takes(run_vllm, tmp_path,
                                                                       monkeypatch):  # fmt: skip
    args = run_vllm.parse_args(["--steps", "mixed", "--work", str(tmp_path)])
    commands = []
    monkeypatch.setattr(run_vllm, "run_logged", lambda name, cmd, a: commands.append(cmd) or True)
    assert run_vllm.step_mixed(args, "qwen3-0.6b")
    sys.path.insert(0, str(REPO / "benchmarks"))
    import mixed_step_bench

    parsed = [mixed_step_bench.parse_args(cmd[2:]) for cmd in commands]
    assert [p.engine for p in parsed] == ["parallm", "vllm"]
    assert all(p.batch_sizes == [16, 64, 128] and p.arrival_lens == [32, 512] for p in parsed)
    args = run_vllm.parse_args(["--steps", "mixed", "--work", str(tmp_path), "--mixed-batch-sizes",
                                "128", "--mixed-arrival-lens", "1024,3500",
                                "--mixed-context-len", "1024"])  # fmt: skip
    commands.clear()
    assert run_vllm.step_mixed(args, "llama-3.1-8b")
    long = mixed_step_bench.parse_args(commands[0][2:])
    assert (long.batch_sizes, long.arrival_lens, long.context_len) == ([128], [1024, 3500], 1024)
    assert {p.config for p in parsed} == {str(REPO / "benchmarks/configs/qwen3-0.6b.json")}
    assert all(p.max_model_len == args.max_model_len and p.out.parent == tmp_path for p in parsed)


def test_a_taken_port_is_refused_before_a_server_starts(run_vllm, tmp_path, monkeypatch, capsys):
    """A server left on the port (a run killed before its cleanup) would answer /health for
    the new one, and the load would measure it: the twenty-seventh session's first A/B did."""
    monkeypatch.setattr(run_vllm, "serving_model_dir", lambda config, folder: folder)
    monkeypatch.setattr(run_vllm, "start_server", lambda *a: pytest.fail("a server started"))
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        trace = write_trace(tmp_path / "t.csv", [(10, 2)] * 3)  # parse_args wants a trace
        args = run_vllm.parse_args(["--steps", "serve", "--servers", "parallm", "--port",
                                    str(port), "--work", str(tmp_path), "--trace", str(trace)])  # fmt: skip
        args.deadline = time.monotonic() + 60
        assert run_vllm.step_serve(args, "qwen3-0.6b") is False
    assert f"port {port} is taken" in capsys.readouterr().out
    assert not run_vllm.port_taken(_free_port())


def test_sigterm_runs_the_cleanup(run_vllm, tmp_path):
    """``timeout`` sends SIGTERM: the run must still reach its ``finally`` (stop the server,
    pack the work), which Python's default handler skips."""
    script = ("import os, signal, sys, time\n"
              f"sys.path[:0] = [{str(run_vllm.__file__.rsplit('/', 1)[0])!r}, {str(REPO)!r}]\n"
              "import run_vllm\n"
              "run_vllm.exit_on_sigterm()\n"
              "try:\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    time.sleep(30)\n"
              "finally:\n"
              "    print('cleaned up', flush=True)\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 128 + 15 and "cleaned up" in done.stdout
