"""parallm and vLLM side by side on the GPU machine, in one call: offline throughput, decode
latency and serving, on the same model shapes, requests and GPU.

Run from the repository root after install_vllm.sh, with its environment
(``source benchmarks/peers/vllm_env.sh``; run_peers.sh does both):

    python3 benchmarks/peers/run_vllm.py --models llama-3.2-1b --steps offline,latency,serve \
        --trace .peers/data/AzureLLMInferenceTrace_conv.csv

- offline: ``parallm bench throughput --compare-vllm`` (the 256-request workload; vLLM's
  ``LLM.generate`` gets the same token ids, in both configurations);
- latency: ``parallm bench latency --compare-vllm`` (batch 1/8/32/128, 128 in, 128 out);
- serve: ``vllm serve`` (each configuration) and ``parallm serve`` in turn on one port, each
  loaded by ``parallm bench serve`` replaying the Azure conversation trace at each time scale;
  ``parallm-vllm-limits`` (not in the default ``--servers``) is parallm with the scheduler
  limits vLLM's defaults take on this GPU (``vllm_server_limits``).
  Both servers get a model folder with the config and parallm's id tokenizer (token i is the
  text ``<i>``), so both stream one non-empty piece per token and detokenize as they would
  with a real model;
- mixed: ``benchmarks/mixed_step_bench.py`` in each engine (vLLM with parallm's limits): a
  decode step with a new prompt in it against a pure decode step, launches and device time
  profiled (why serving's TPOT differs; RESULTS, fourteenth session).

Every step writes parallm's bench JSON (rows side by side) and a log under ``--work``;
summary.json and summary.md gather the figures RESULTS.md needs. At the end everything is
packed into one tar.gz in ``$OUT`` with the summaries and this run's log beside it (the device
tool returns at most 8 files). A failed step is logged and the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: serve_gaps

import serve_gaps
import serve_profile
import server_counters  # benchmarks/peers, this script's folder

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "benchmarks" / "configs"
STEPS = ("smoke", "offline", "latency", "serve", "mixed")
DEFAULT_SERVERS = ("parallm", "vllm-stock", "vllm-parallm-limits")
SERVERS = (*DEFAULT_SERVERS, "parallm-vllm-limits")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--models", default="llama-3.2-1b",
                   help="model shapes from benchmarks/configs, separated by commas")  # fmt: skip
    p.add_argument("--steps", default="offline,latency,serve",
                   help=f"steps to run, separated by commas, from {', '.join(STEPS)}")  # fmt: skip
    p.add_argument("--vllm-configs", default="stock,parallm-limits",
                   help="offline: vLLM configurations (latency runs stock; serve: --servers)")  # fmt: skip
    p.add_argument("--batch-sizes", default="1,8,32,128", help="latency batch sizes")
    p.add_argument("--max-model-len", type=int, default=4096, help="context limit of every run")
    p.add_argument("--mixed-batch-sizes", default="16,64,128",
                   help="mixed: requests decoding beside each new prompt, separated by commas")  # fmt: skip
    p.add_argument("--mixed-arrival-lens", default="32,512",
                   help="mixed: the new prompt's tokens, separated by commas")  # fmt: skip
    p.add_argument("--mixed-context-len", type=int, default=128,
                   help="mixed: the decoding requests' prompt tokens")  # fmt: skip
    p.add_argument("--trace", type=Path, default=REPO / ".peers/data/AzureLLMInferenceTrace_conv.csv",
                   help="the Azure conversation trace CSV (serve)")  # fmt: skip
    p.add_argument("--time-scales", default="4,16",
                   help="serve: trace replay speed-ups, one load each, separated by commas")  # fmt: skip
    p.add_argument("--trace-duration-s", type=float, default=120.0,
                   help="serve: seconds of trace replayed (trace time, before scaling)")  # fmt: skip
    p.add_argument("--max-input-tokens", type=int, default=3500,
                   help="serve: cap on a trace request's prompt tokens")  # fmt: skip
    p.add_argument("--goodput", default="ttft:500 tpot:50", help="serve: SLOs of goodput")
    p.add_argument("--warmup-trace-s", type=float, default=15.0,
                   help="serve: seconds of the trace each server replays at the last time "
                        "scale before the measured loads, not recorded (0: none). A cold server "
                        "compiles and loads kernels for new shapes under load: both engines' "
                        "TTFT p50 read 2.0-2.2 s at x16 when it came first, 36-41 ms after x4 "
                        "(eighteenth session)")  # fmt: skip
    p.add_argument("--profile-seconds", type=float, default=0.0,
                   help="serve: after the measured loads, one more at the first time scale "
                   "during which each server profiles itself (--profiler-config, "
                   "/start_profile, /stop_profile) for this many seconds from --profile-at "
                   "of its arrivals on; the device's busy share, idle gaps and kernels a step go "
                   "to profile_serve_*.json and the log (0: no profile)")  # fmt: skip
    p.add_argument("--profile-at", type=float, default=0.4,
                   help="serve: where in the profiled load's arrivals the profile starts, as a "
                   "share of their span (0 to below 1). The Azure trace at x4 has 15-40 "
                   "requests decoding at 0.4 and 80-100 near 0.75 (twenty-sixth session)")  # fmt: skip
    p.add_argument("--servers", default=",".join(DEFAULT_SERVERS),
                   help=f"serve: servers to load, from {', '.join(SERVERS)}")  # fmt: skip
    p.add_argument("--port", type=int, default=8100, help="serve: port of the server under test")
    p.add_argument("--start-timeout-s", type=float, default=420.0,
                   help="serve: longest wait for a server to answer /health")  # fmt: skip
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="no step starts after this many seconds, and a step still running "
                   "then is killed (the device tool stops a call at 600 s)")  # fmt: skip
    p.add_argument("--keep-going", action="store_true",
                   help="run the remaining steps after a failed one (default: stop, to save "
                   "device time)")  # fmt: skip
    p.add_argument("--work", type=Path, default=Path("/tmp/peers-work"),
                   help="folder of every JSON, plot and log (packed into $OUT at the end)")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")),
                   help="where the tar.gz and the summaries go (the device tool's $OUT)")  # fmt: skip
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.steps = [s for s in args.steps.split(",") if s]
    args.servers = [s for s in args.servers.split(",") if s]
    for name, given, allowed in (
        ("--steps", args.steps, STEPS),
        ("--servers", args.servers, SERVERS),
    ):
        bad = [g for g in given if g not in allowed]
        if bad:
            p.error(f"{name}: unknown {', '.join(bad)}; allowed: {', '.join(allowed)}")
    for flag in ("--mixed-batch-sizes", "--mixed-arrival-lens"):
        text = getattr(args, flag[2:].replace("-", "_"))
        if not all(item.isdigit() and int(item) > 0 for item in text.split(",")):
            p.error(f"{flag}: expected positive integers separated by commas, got {text!r}")
    for model in args.models:
        if not (CONFIGS / f"{model}.json").is_file():
            known = ", ".join(sorted(c.stem for c in CONFIGS.glob("*.json")))
            p.error(f"--models: no benchmarks/configs/{model}.json; known: {known}")
    if not 0.0 <= args.profile_at < 1.0:
        p.error(f"--profile-at: expected a share of the arrivals from 0 to below 1, "
                f"got {args.profile_at}")  # fmt: skip
    if "serve" in args.steps and not args.trace.is_file():
        p.error(f"--trace {args.trace}: no such file (carry .peers/data, see README.md)")
    return args


# ---- steps ------------------------------------------------------------------------------------


def parallm_cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "parallm.cli", *argv]


def run_logged(name: str, cmd: list[str], args: argparse.Namespace) -> bool:
    """Run ``cmd`` with its output in work/logs/NAME.log; print its tail; True if it passed.
    Past the run's deadline its whole process group is killed (vLLM's engine core too)."""
    log = args.work / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                start_new_session=True)  # fmt: skip
        try:
            code: int | str = proc.wait(timeout=max(args.deadline - start, 1.0))
        except subprocess.TimeoutExpired:
            code = "killed at the run's --budget-s"
        finally:
            stop_group(proc, grace_s=10)
    tail = log.read_text(errors="replace").splitlines()[-14:]
    print("\n".join(f"   {line[:400]}" for line in tail))
    print(f"== {name}: exit {code} after {time.monotonic() - start:.0f} s", flush=True)
    return code == 0


def run_bench(
    args: argparse.Namespace, name: str, model: str, *flags: str, plot: bool = True
) -> bool:
    """``parallm bench <flags> --compare-vllm`` on the model's config and context limit,
    logged as ``<name>_<model>``, its JSON (and plot) in the work folder."""
    stem = args.work / f"{name}_{model}"
    plotting = ("--plot", f"{stem}.png") if plot else ()
    return run_logged(f"{name}_{model}", parallm_cli(
        "bench", *flags, "--config", str(CONFIGS / f"{model}.json"),
        "--max-model-len", str(args.max_model_len), "--compare-vllm",
        "--out", f"{stem}.json", *plotting,
    ), args)  # fmt: skip


def step_smoke(args: argparse.Namespace, model: str) -> bool:
    """A small run of both engines: does vLLM start and generate here at all."""
    return run_bench(args, "smoke", model, "throughput", "--num-requests", "32", "--min-len",
                     "32", "--max-len", "128", "--vllm-configs", "stock", plot=False)  # fmt: skip


def step_offline(args: argparse.Namespace, model: str) -> bool:
    return run_bench(args, "throughput", model, "throughput", "--vllm-configs", args.vllm_configs)


def step_latency(args: argparse.Namespace, model: str) -> bool:
    return run_bench(args, "latency", model, "latency", "--batch-sizes", args.batch_sizes,
                     "--vllm-configs", "stock")  # fmt: skip


def step_mixed(args: argparse.Namespace, model: str) -> bool:
    """Mixed and pure decode steps timed and profiled in parallm, then in vLLM."""
    ok = True
    for engine in ("parallm", "vllm"):
        name = f"mixed_{model}_{engine}"
        ok &= run_logged(name, [
            sys.executable, str(REPO / "benchmarks" / "mixed_step_bench.py"),
            "--config", str(CONFIGS / f"{model}.json"), "--engine", engine,
            "--max-model-len", str(args.max_model_len), "--out", str(args.work / f"{name}.json"),
            "--batch-sizes", args.mixed_batch_sizes, "--arrival-lens", args.mixed_arrival_lens,
            "--context-len", str(args.mixed_context_len),
        ], args)  # fmt: skip
    return ok


def step_serve(args: argparse.Namespace, model: str) -> bool:
    """Each server in turn on one port, loaded at each time scale; True if all ran."""
    folder = serving_model_dir(CONFIGS / f"{model}.json", args.work / "models" / model)
    limits = parallm_limits(args)
    ok = True
    for server in args.servers:
        name = f"serve_{model}_{server}"
        log = args.work / "logs" / f"{name}_server.log"
        peer = vllm_server_limits(*gpu_memory_and_name()) if server == "parallm-vllm-limits" else {}
        command = server_command(server, folder, args, limits, peer)
        profiles = args.work / "profiles" / name
        if args.profile_seconds > 0:
            command += serve_profile.profiler_flags(profiles, vllm=server.startswith("vllm"))
        if port_taken(args.port):  # its /health would pass for ours, and the load measure it
            print(f"== {name}: port {args.port} is taken: a server left from an earlier run? "
                  "Stop it or pick another --port")  # fmt: skip
            ok = False
            continue
        proc = start_server(command, log)
        try:
            wait_s = min(args.start_timeout_s, args.deadline - time.monotonic())
            if not wait_healthy(proc, args.port, wait_s):
                print(f"== {name}: no answer on /health; server log tail:")
                print("\n".join(log.read_text(errors="replace").splitlines()[-20:]))
                ok = False
                continue
            scales = args.time_scales.split(",")
            if args.warmup_trace_s > 0:  # not in the summary: its JSON is not serve_*_x*.json
                ok &= run_logged(f"warmup_{name}", serve_load(
                    args, scales[-1], args.warmup_trace_s, args.work / f"warmup_{name}.json"
                ), args)  # fmt: skip
            before = read_counters(args.port)
            for scale in scales:  # one scrape between loads: the end of one, the start of the next
                out = args.work / f"{name}_x{scale}.json"
                ok &= run_logged(f"{name}_x{scale}",
                                 serve_load(args, scale, args.trace_duration_s, out), args)  # fmt: skip
                after = read_counters(args.port)
                write_counters(args.work / f"counters_{name}_x{scale}.json", before, after, out)
                before = after
            if args.profile_seconds > 0:
                ok &= profile_server(args, name, scales[0], profiles)
        finally:
            stop_group(proc, grace_s=30)
            time.sleep(3)  # the driver hands the GPU memory back
    return ok


def profile_server(args: argparse.Namespace, name: str, scale: str, profiles: Path) -> bool:
    """One more load at ``scale``, profiled by the server from ``--profile-at`` of its
    arrivals on for ``--profile-seconds``; the device's summary (``serve_profile``) with the
    profiled engine steps and their tokens a step goes to profile_NAME.json. The traces are
    deleted once read (tens of MB; the tables beside them stay)."""
    arrivals_s = args.trace_duration_s / float(scale)
    ok, before, after = serve_profile.profiled_load(
        serve_load(args, scale, args.trace_duration_s, args.work / f"profiled_{name}.json"),
        args.port, args.profile_at * arrivals_s, args.profile_seconds,
        args.work / "logs" / f"profiled_{name}.log", lambda: read_counters(args.port),
    )  # fmt: skip
    found = serve_profile.device_trace(profiles) if profiles.is_dir() else None
    if found is None:
        print(f"== {name}: no trace with device activity in {profiles}")
        return False
    trace, events = found
    row = {"summary": serve_profile.kernel_summary(events), "trace": trace.name,
           "step_shapes": serve_profile.step_shapes(events), **_window(before, after)}  # fmt: skip
    (args.work / f"profile_{name}.json").write_text(json.dumps(row, indent=2))
    print(serve_profile.per_step_table({name: row}))
    print(serve_profile.step_shape_table({name: row}))
    for path in profiles.glob("*.pt.trace.json*"):
        path.unlink()
    return ok


def _window(before: dict | None, after: dict | None) -> dict[str, Any]:
    """The engine steps between two /metrics scrapes and their tokens a step (what the
    profiled window ran, to compare two engines' windows); empty where /metrics did not
    answer."""
    if before is None or after is None:
        return {}
    d = server_counters.difference(before, after, 1.0)
    return {"steps": int(d["steps"]), "tokens_per_step": d.get("tokens_per_step")}


def read_counters(port: int) -> dict[str, Any] | None:
    """The server's engine counters (``server_counters``), or None, said, where /metrics does
    not answer: the load's figures stand without them."""
    try:
        return server_counters.scrape(f"http://127.0.0.1:{port}")
    except (OSError, ValueError) as exc:
        print(f"   /metrics unreadable ({exc}): no engine counters for this load")
        return None


def write_counters(path: Path, before: dict | None, after: dict | None, bench_json: Path) -> None:
    """What the engine did during one load, over the bench's measured duration."""
    if before is None or after is None or not bench_json.is_file():
        return
    duration_s = json.loads(bench_json.read_text())["summary"]["duration_s"]
    path.write_text(json.dumps(server_counters.difference(before, after, duration_s), indent=2))


def serve_load(args: argparse.Namespace, scale: str, trace_s: float, out: Path) -> list[str]:
    """``parallm bench serve`` replaying ``trace_s`` seconds of the trace ``scale`` times faster
    against the server on ``--port``; each request's gaps kept for ``serve_gaps.py``."""
    return parallm_cli(
        "bench", "serve", "--base-url", f"http://127.0.0.1:{args.port}", "--dataset-name",
        "trace", "--dataset-path", str(args.trace), "--time-scale", scale,
        "--trace-duration-s", str(trace_s), "--max-input-tokens", str(args.max_input_tokens),
        "--goodput", *args.goodput.split(), "--no-progress", "--save-detailed", "--out",
        str(out),
    )  # fmt: skip


# ---- servers ----------------------------------------------------------------------------------


def serving_model_dir(config: Path, folder: Path) -> Path:
    """config.json plus parallm's id tokenizer saved beside it, for both servers."""
    from parallm.tokenizer import id_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config, folder / "config.json")
    id_tokenizer(json.loads(config.read_text())["vocab_size"]).save_pretrained(str(folder))
    return folder


# The limits `vllm serve` is given for "vllm-parallm-limits" (prefix caching and chunked
# prefill are on in both servers by default).
SERVER_LIMITS = ("max_num_seqs", "max_num_batched_tokens", "block_size", "gpu_memory_utilization")


def parallm_limits(args: argparse.Namespace) -> dict[str, Any]:
    """parallm serve's scheduler and memory limits at ``--max-model-len``, from its own
    defaults, as `vllm serve` flags (without the dashes)."""
    from parallm.bench.vllm_peer import vllm_limits
    from parallm.config import EngineConfig

    limits = vllm_limits(EngineConfig(), args.max_model_len)
    return {key.replace("_", "-"): limits[key] for key in SERVER_LIMITS}


def vllm_server_limits(total_memory: int, device_name: str) -> dict[str, int]:
    """The scheduler limits ``vllm serve`` 0.26.0 takes by default on a GPU of
    ``total_memory`` bytes named ``device_name`` (its ``EngineArgs`` picks them by device: 1,024
    sequences and 8,192 batched tokens from 70 GiB up, A100s excepted; 256 and 2,048 below), as
    ``parallm serve`` flags without the dashes. Why: vLLM's defaults admit four times
    parallm's 256 sequences on an H100, which is most of the 8B's goodput gap at x16 (RESULTS,
    sixteenth session); this server says what parallm does with the same admission."""
    large = total_memory >= 70 * 2**30 and "a100" not in device_name.lower()
    return {"max-num-seqs": 1024 if large else 256,
            "max-num-batched-tokens": 8192 if large else 2048}  # fmt: skip


def gpu_memory_and_name() -> tuple[int, str]:
    import torch

    props = torch.cuda.get_device_properties(0)
    return props.total_memory, props.name


def server_command(server: str, folder: Path, args: argparse.Namespace,
                   limits: dict[str, Any], peer_limits: dict[str, Any] | None = None,
                   ) -> list[str]:  # fmt: skip
    """``limits``: parallm's, given to "vllm-parallm-limits"; ``peer_limits``: vLLM's
    defaults on this GPU (``vllm_server_limits``), given to "parallm-vllm-limits"."""
    common = ["--load-format", "dummy", "--dtype", "bfloat16", "--max-model-len",
              str(args.max_model_len), "--port", str(args.port), "--served-model-name", "peer",
              "--seed", "0"]  # fmt: skip
    if server.startswith("parallm"):
        extra = peer_limits if server == "parallm-vllm-limits" else {}
        return parallm_cli("serve", "--model", str(folder), *common, *_flags(extra or {}))
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(folder), *common]
    if server == "vllm-parallm-limits":
        cmd += _flags(limits)
    return cmd


def _flags(values: dict[str, Any]) -> list[str]:
    return [item for flag, value in values.items() for item in (f"--{flag}", str(value))]


def start_server(cmd: list[str], log: Path) -> subprocess.Popen:
    """In its own process group, so that stopping it also stops vLLM's engine-core process."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"== server: {' '.join(cmd)}", flush=True)
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                start_new_session=True)  # fmt: skip


def port_taken(port: int) -> bool:
    """Whether something on this host accepts connections on ``port``."""
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def exit_on_sigterm() -> None:
    """SIGTERM (``timeout``, the device tool's limit) raises SystemExit, so that the servers'
    ``finally`` stops them and the work is packed; by default Python dies at once and leaves
    the server of its own session listening, for the next run to load by mistake."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def wait_healthy(proc: subprocess.Popen, port: int, timeout_s: float) -> bool:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                if resp.status == 200:
                    print(f"== server healthy after {time.monotonic() - start:.0f} s", flush=True)
                    return True
        except OSError:
            pass
        time.sleep(1.0)
    return False


def stop_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the process group, SIGKILL after ``grace_s``, then SIGKILL to whatever is
    left in the group (vLLM's engine core outlives a killed server otherwise)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# ---- summary ----------------------------------------------------------------------------------


def summarize(work: Path) -> dict[str, Any]:
    """The figures RESULTS.md's side-by-side table needs, from every JSON of the run."""
    out: dict[str, Any] = {"offline": {}, "latency": {}, "serve": {}}
    for path in sorted(work.glob("throughput_*.json")):
        rows = json.loads(path.read_text())["results"]
        out["offline"][path.stem.removeprefix("throughput_")] = {
            r["engine"]: r["output_tokens_per_s"] for r in rows
        }
    for path in sorted(work.glob("latency_*.json")):
        rows = json.loads(path.read_text())["results"]
        table: dict[str, dict[str, float]] = {}
        for r in rows:
            table.setdefault(r["engine"], {})[str(r["batch_size"])] = r["ms_per_token"]
        out["latency"][path.stem.removeprefix("latency_")] = table
    for path in sorted(work.glob("serve_*_x*.json")):
        payload = json.loads(path.read_text())
        s = payload["summary"]
        out["serve"][path.stem.removeprefix("serve_")] = {
            "ttft_p50": s["ttft_ms"]["p50"], "ttft_p99": s["ttft_ms"]["p99"],
            "tpot_p50": s["tpot_ms"]["p50"], "tpot_p99": s["tpot_ms"]["p99"],
            "goodput": s["goodput"], "completed": s["completed"], "failed": s["failed"],
            "output_token_throughput": s["output_token_throughput"],
            "itl_p50": s.get("itl_ms", {}).get("p50"), "itl_p90": s.get("itl_ms", {}).get("p90"),
        }  # fmt: skip
        requests = payload.get("requests") or []
        if any("itl_s" in r for r in requests):  # `--save-detailed`: the stalls behind ITL p90
            out.setdefault("stalls", {})[path.stem.removeprefix("serve_")] = serve_gaps.summarize(
                path, STALL_BANDS_MS, STALL_MS, STALL_JOIN_MS, payload
            )
        counters = path.with_name(f"counters_{path.name}")
        if counters.is_file():
            c = json.loads(counters.read_text())
            out["serve"][path.stem.removeprefix("serve_")].update(
                {
                    key: c.get(key)
                    for key in ("steps", "tokens_per_step", "ms_per_step", "overlapped_share")
                }  # fmt: skip
            )
    for path in sorted(work.glob("profile_serve_*.json")):
        out.setdefault("profile", {})[path.stem.removeprefix("profile_serve_")] = json.loads(
            path.read_text()
        )
    return out


def markdown(summary: dict[str, Any]) -> str:
    lines = ["| model | engine | offline out tok/s | b1 ms | b8 ms | b32 ms | b128 ms |",
             "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    models = sorted(set(summary["offline"]) | set(summary["latency"]))
    for model in models:
        offline, lat = summary["offline"].get(model, {}), summary["latency"].get(model, {})
        for engine in dict.fromkeys([*offline, *lat]):
            ms = [lat.get(engine, {}).get(b) for b in ("1", "8", "32", "128")]
            cells = [_fmt(offline.get(engine), ".0f"), *(_fmt(m, ".3f") for m in ms)]
            lines.append(f"| {model} | {engine} | " + " | ".join(cells) + " |")
    lines += ["", "| model, server, load | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | ITL p90 | "
              "goodput req/s | completed/failed | steps | tokens a step | ms a step | launched "
              "ahead |", "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]  # fmt: skip
    for key, s in summary["serve"].items():
        cells = [_fmt(s.get(k), ".1f")
                 for k in ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99", "itl_p90")]  # fmt: skip
        engine = [_fmt(s.get("steps"), ".0f"), _fmt(s.get("tokens_per_step"), ".1f"),
                  _fmt(s.get("ms_per_step"), ".2f"), _fmt(s.get("overlapped_share"), ".0%")]  # fmt: skip
        lines.append(f"| {key} | " + " | ".join(cells)
                     + f" | {_fmt(s['goodput'], '.2f')} | {s['completed']}/{s['failed']} | "
                     + " | ".join(engine) + " |")  # fmt: skip
    if summary.get("stalls"):
        lines += ["", serve_gaps.table(list(summary["stalls"].values()), STALL_MS)]
    if summary.get("profile"):
        lines += [
            "",
            serve_profile.per_step_table(summary["profile"]),
            serve_profile.step_shape_table(summary["profile"]),
        ]
    return "\n".join(lines) + "\n"


# The serving runs' stalls (benchmarks/serve_gaps.py): a gap of 25 ms or more is over 1.5
# decode steps of the 8B at x4; stalls of different requests ending within 2 ms are one step.
STALL_MS, STALL_JOIN_MS, STALL_BANDS_MS = 25.0, 2.0, [25.0, 50.0]


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def write_summaries(out: Path, summary: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(markdown(summary))


def pack(work: Path, out: Path, summary: dict[str, Any]) -> None:
    """summary.json, summary.md and one tar.gz of the whole work folder into ``out``."""
    write_summaries(out, summary)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with tarfile.open(out / f"peers-{stamp}.tar.gz", "w:gz") as tar:
        for path in sorted(work.iterdir()):
            if path.name != "models":  # generated again from benchmarks/configs
                tar.add(path, arcname=f"peers-{stamp}/{path.name}")
    print(markdown(summary))
    print(f"packed {work} into {out}/peers-{stamp}.tar.gz")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    args.work.mkdir(parents=True, exist_ok=True)
    args.deadline = time.monotonic() + args.budget_s
    steps = {"smoke": step_smoke, "offline": step_offline, "latency": step_latency,
             "serve": step_serve, "mixed": step_mixed}  # fmt: skip
    failed = []
    try:
        for model, step in [(m, s) for m in args.models for s in args.steps]:
            if time.monotonic() > args.deadline:
                print(f"== --budget-s spent: {step} of {model} and later steps not run")
                break
            if not steps[step](args, model):
                failed.append(f"{step} of {model}")
                if not args.keep_going:
                    print("== stopping after a failed step (--keep-going runs the rest)")
                    break
            write_summaries(args.out, summarize(args.work))  # kept even if the call is cut
    finally:
        pack(args.work, args.out, summarize(args.work))
    print(f"== failed: {', '.join(failed)}" if failed else "== every step ran")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
