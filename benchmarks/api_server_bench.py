"""The API server's own cost, on CPU: the real server and engine-core transport around a fake
engine whose step emits one token per running request every ``--step-ms``.

What runs is what ``parallm serve`` runs (``build_app`` under uvicorn, ``EngineCoreClient``
spawning the engine-core process, ``EngineCoreLoop`` there, msgspec over ZeroMQ, detokenization
and SSE in the API process), except that the core's engine is ``FakeEngine``: it admits up to
``--max-num-seqs`` requests, then each step gives every running request one random token (the
id tokenizer's ``<id>`` text, as the GPU serving benchmarks use) and takes ``--step-ms`` in
all. A closed-loop load of ``--concurrency`` streams (each request followed by the next) comes
from a separate process: the lean client below by default, or ``parallm bench serve``'s
(``--client bench``, heavier per chunk).

Reported: tokens/s the server sustains (total = prompt + output, as ``bench serve`` counts),
TPOT p50/p99 and what it adds over the fake step, CPU seconds per 1k output tokens in the
API process and in the core, and with ``--profile`` the top functions by own time of the API
process's event loop thread, its output-delivery thread, and the core.

    python benchmarks/api_server_bench.py --concurrency 128 --duration-s 20 --profile
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import multiprocessing as mp
import os
import pstats
import random
import resource
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

VOCAB_SIZE = 128256  # Llama-3's, as in the GPU serving runs


# ---- the fake engine (runs in the engine-core process) ----------------------------------------


@dataclass
class _FakeRequest:
    request_id: str
    max_tokens: int
    arrival_time: float
    num_output: int = 0
    first_token_time: float | None = None


class FakeEngine:
    """What ``EngineCoreLoop`` and ``engine_info``/``engine_stats`` read of an ``LLMEngine``,
    with a step that sleeps instead of running a model. Requests are added with ``stream=True``
    (the core always does), so each step reports one-token deltas."""

    def __init__(self, step_s: float, max_num_seqs: int, max_model_len: int,
                 profile_path: str | None) -> None:  # fmt: skip
        from parallm.tokenizer import id_tokenizer

        self.step_s = step_s
        self.tokenizer = id_tokenizer(VOCAB_SIZE)
        self.max_model_len = max_model_len
        self.config = SimpleNamespace(model="fake")
        self.model_config = SimpleNamespace(vocab_size=VOCAB_SIZE)
        stats = SimpleNamespace(num_prefix_cache_queried_tokens=0, num_prefix_cache_hit_tokens=0,
                                num_preemptions=0, num_prefill_tokens_computed=0)  # fmt: skip
        self.scheduler = SimpleNamespace(
            cfg=SimpleNamespace(max_num_seqs=max_num_seqs), stats=stats, running=[], waiting=[]
        )
        self.kv = SimpleNamespace(num_blocks=1 << 16, num_free_blocks=1 << 16, block_size=16,
                                  num_cached_blocks=0, enable_prefix_caching=True)  # fmt: skip
        self.spec_stats = SimpleNamespace(draft_tokens=0, accepted_tokens=0, num_proposals=0,
                                          accepted_per_position=[])  # fmt: skip
        self.num_steps = 0
        self.num_overlapped_steps = 0  # its steps never run ahead of one another
        self.profiler = None  # built without profiler_config
        self.num_generated_tokens = 0
        self.step_observer: Any = None
        self.requests: dict[str, _FakeRequest] = {}
        self._rng = random.Random(0)
        self._profile_path = profile_path
        self._profiler = cProfile.Profile() if profile_path else None
        if self._profiler is not None:
            self._profiler.enable()

    def summary(self) -> str:
        return f"fake engine: {self.step_s * 1e3:.2f} ms steps"

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: Any,
                    prompt: str | None = None, stream: bool = False,
                    arrival_time: float | None = None) -> None:  # fmt: skip
        request = _FakeRequest(request_id, params.max_tokens, arrival_time or time.monotonic())
        self.requests[request_id] = request
        self.scheduler.waiting.append(request)

    def abort_request(self, request_id: str) -> Any:
        from parallm.outputs import CompletionOutput, RequestOutput

        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for queue in (self.scheduler.running, self.scheduler.waiting):
            if request in queue:
                queue.remove(request)
        sample = CompletionOutput(0, "", [], finish_reason="abort")
        return RequestOutput(request_id, None, [], [sample], finished=True)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[Any]:
        from parallm.outputs import CompletionOutput, RequestMetrics, RequestOutput

        start = time.perf_counter()
        sched = self.scheduler
        while sched.waiting and len(sched.running) < sched.cfg.max_num_seqs:
            sched.running.append(sched.waiting.pop(0))
        now = time.monotonic()
        outputs, still_running = [], []
        for r in sched.running:
            r.num_output += 1
            if r.first_token_time is None:
                r.first_token_time = now
            done = r.num_output >= r.max_tokens
            token = self._rng.randrange(VOCAB_SIZE)
            sample = CompletionOutput(0, "", [token], finish_reason="length" if done else None)
            out = RequestOutput(r.request_id, None, [], [sample], finished=done)
            if done:
                out.metrics = RequestMetrics(r.arrival_time, r.first_token_time,
                                             r.first_token_time, now, now)  # fmt: skip
                del self.requests[r.request_id]
            else:
                still_running.append(r)
            outputs.append(out)
        sched.running = still_running
        self.num_steps += 1
        self.num_generated_tokens += len(outputs)
        if self.step_observer is not None:
            self.step_observer(len(outputs))
        # The model's step: what is left of step_s after this host work.
        time.sleep(max(0.0, self.step_s - (time.perf_counter() - start)))
        return outputs

    def close(self) -> None:
        if self._profiler is not None:
            self._profiler.disable()
            self._profiler.dump_stats(self._profile_path)


def make_fake_engine(**kwargs: Any) -> FakeEngine:
    """``EngineCoreClient``'s engine factory (runs in the core process)."""
    return FakeEngine(**kwargs)


# ---- the load (its own process) -----------------------------------------------------------------


@dataclass
class StreamResult:
    ttft_s: float
    e2e_s: float
    output_tokens: int
    prompt_tokens: int
    chunks: int


@dataclass
class LoadResult:
    streams: list[StreamResult] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0


async def _lean_stream(host: str, port: int, body: bytes) -> StreamResult:
    """One streaming completion over a raw connection: times the first event and the end,
    and reads the token counts from the usage chunk (no JSON parsing per chunk)."""
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head.split(b"\r\n", 1)[0].decode())
    ttft = None
    chunks = 0
    tail = b""
    while True:
        data = await reader.read(65536)
        if not data:
            break
        now = time.perf_counter()
        events = data.count(b"data: ")
        if events and ttft is None:
            ttft = now - start
        chunks += events
        tail = (tail + data)[-4096:]
    writer.close()
    e2e = time.perf_counter() - start
    usage_at = tail.rfind(b'"usage":{')
    if ttft is None or b"[DONE]" not in tail or usage_at < 0:
        raise RuntimeError(f"incomplete stream: {tail[-300:]!r}")
    usage = json.loads(tail[usage_at + 8 : tail.index(b"}", usage_at) + 1])
    return StreamResult(
        ttft, e2e, usage["completion_tokens"], usage["prompt_tokens"], chunks - 2
    )  # fmt: skip  (the usage chunk and [DONE])


async def _bench_stream(session: Any, url: str, body: dict[str, Any], output_len: int,
                        input_len: int) -> StreamResult:  # fmt: skip
    from parallm.bench.serve_client import ClientConfig, RequestResult, stream_one
    from parallm.bench.serve_workload import RequestSpec

    cfg = ClientConfig(base_url=url + "/v1", model="fake")
    spec = RequestSpec(0, 0.0, body["prompt"], input_len, output_len)
    result = RequestResult(0, output_len, input_len)
    await stream_one(session, cfg, spec, result)
    return StreamResult(result.ttft_s, result.e2e_s, result.output_tokens,
                        result.prompt_tokens or input_len, len(result.itl_s) + 1)  # fmt: skip


async def _closed_loop(args: argparse.Namespace, url: str) -> LoadResult:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    rng = random.Random(1)
    result = LoadResult()
    session = None
    if args.client == "bench":  # (imported here: the lean client needs none of it)
        from parallm.bench.serve_client import ClientConfig, client_session

        session = client_session(ClientConfig(base_url=url + "/v1", model="fake"))
    deadline = time.perf_counter() + args.duration_s  # after the set-up

    async def worker() -> None:
        while time.perf_counter() < deadline:
            prompt = "".join(f"<{rng.randrange(VOCAB_SIZE)}>" for _ in range(args.prompt_len))
            body = {"model": "fake", "prompt": prompt, "max_tokens": args.output_len,
                    "stream": True, "stream_options": {"include_usage": True},
                    "ignore_eos": True}  # fmt: skip
            try:
                if args.client == "lean":
                    done = await _lean_stream(host, int(port), json.dumps(body).encode())
                else:
                    done = await _bench_stream(session, url, body, args.output_len, args.prompt_len)
            except Exception as exc:  # a failed request is data
                result.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            if time.perf_counter() <= deadline:  # only streams that ended in the window
                result.streams.append(done)

    start = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    finally:
        if session is not None:
            await session.close()
    result.elapsed_s = time.perf_counter() - start
    return result


def _load_process(args: argparse.Namespace, url: str, conn: Any) -> None:
    conn.send(asyncio.run(_closed_loop(args, url)))


# ---- the server (this process) and the report ---------------------------------------------------


class ThreadProfiles:
    """cProfile in the event loop thread and in the output-delivery thread of the API process
    (cProfile sees only the thread that enabled it)."""

    def __init__(self) -> None:
        self.loop = cProfile.Profile()
        self.delivery = cProfile.Profile()
        self._delivery_on = False

    def wrap_delivery(self, async_engine: Any) -> None:
        take = async_engine._on_outputs

        def profiled(*a: Any) -> None:
            if not self._delivery_on:
                self._delivery_on = True
                self.delivery.enable()
            take(*a)

        async_engine._on_outputs = profiled


def _top(stats_source: Any, n: int) -> str:
    out = io.StringIO()
    stats = pstats.Stats(stats_source, stream=out)
    stats.strip_dirs().sort_stats("tottime").print_stats(n)
    lines = out.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if "ncalls" in line)
    total = next((line for line in lines if "function calls" in line), "").strip()
    return "\n".join([total, *lines[start : start + n + 1]])


def run(args: argparse.Namespace) -> dict[str, Any]:
    from parallm.engine.core.client import EngineCoreClient
    from parallm.server.app import build_app

    core_profile = f"/tmp/api_server_bench_core_{os.getpid()}.prof" if args.profile else None
    engine_kwargs = dict(step_s=args.step_ms / 1e3, max_num_seqs=args.max_num_seqs,
                         max_model_len=args.prompt_len * 8 + args.output_len * 2,
                         profile_path=core_profile)  # fmt: skip
    core = EngineCoreClient(engine_kwargs, engine_factory=make_fake_engine)
    app = build_app(core, "fake", max_num_waiting=4096, log_stats=False)
    profiles = ThreadProfiles() if args.profile else None
    if profiles is not None:
        profiles.wrap_delivery(app.state.ctx.engine)
    with _serving(app, profiles) as url:
        ctx = mp.get_context("spawn")
        ours, theirs = ctx.Pipe()
        cpu0, core_cpu0 = _cpu(), _process_cpu(core.pid)
        load = ctx.Process(target=_load_process, args=(args, url, theirs))
        load.start()
        result: LoadResult = ours.recv()
        load.join()
        api_cpu, core_cpu = _cpu() - cpu0, _process_cpu(core.pid) - core_cpu0
        if profiles is not None:
            profiles.delivery.disable()
    report = _report(args, result, api_cpu, core_cpu)
    if profiles is not None:
        report["profile"] = {
            "api_event_loop": _top(profiles.loop, args.profile_top),
            "api_delivery_thread": _top(profiles.delivery, args.profile_top),
            "core": _top(core_profile, args.profile_top),
        }
        with contextlib.suppress(OSError):
            os.remove(core_profile)
    return report


@contextlib.contextmanager
def _serving(app: Any, profiles: ThreadProfiles | None) -> Any:
    """The app under uvicorn on a thread of this process (profiled from its first line when
    asked); yields its URL; shuts down as on SIGTERM."""
    from parallm.server.launcher import DrainingServer, bind_socket

    server = DrainingServer(app, drain_timeout_s=1.0, log_level="warning", access_log=False)
    sock = bind_socket("127.0.0.1", 0)

    def serve() -> None:
        if profiles is not None:
            profiles.loop.enable()
        try:
            server.run(sockets=[sock])
        finally:
            if profiles is not None:
                profiles.loop.disable()

    thread = threading.Thread(target=serve, name="parallm-uvicorn", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(60)


def _cpu() -> float:
    """CPU seconds of this process (every thread), user + system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _process_cpu(pid: int) -> float:
    """CPU seconds of another process so far (user + system, from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _report(args: argparse.Namespace, result: LoadResult, api_cpu: float,
            core_cpu: float) -> dict[str, Any]:  # fmt: skip
    streams = result.streams
    out_tokens = sum(s.output_tokens for s in streams)
    in_tokens = sum(s.prompt_tokens for s in streams)
    elapsed = max(args.duration_s, 1e-9)
    tpots = sorted((s.e2e_s - s.ttft_s) / (s.output_tokens - 1) * 1e3
                   for s in streams if s.output_tokens > 1)  # fmt: skip
    ttfts = sorted(s.ttft_s * 1e3 for s in streams)

    def pct(values: list[float], p: float) -> float | None:
        return values[min(len(values) - 1, int(p * len(values)))] if values else None

    tpot_p50 = pct(tpots, 0.5)
    return {
        "step_ms": args.step_ms, "concurrency": args.concurrency, "client": args.client,
        "prompt_len": args.prompt_len, "output_len": args.output_len,
        "completed": len(streams), "failed": len(result.failures),
        "errors": result.failures[:3],
        "output_tok_s": out_tokens / elapsed,
        "total_tok_s": (in_tokens + out_tokens) / elapsed,
        "tpot_ms_p50": tpot_p50, "tpot_ms_p99": pct(tpots, 0.99),
        "tpot_added_ms_p50": None if tpot_p50 is None else tpot_p50 - args.step_ms,
        "ttft_ms_p50": pct(ttfts, 0.5), "ttft_ms_p99": pct(ttfts, 0.99),
        "tokens_per_chunk": out_tokens / max(1, sum(s.chunks for s in streams)),
        "api_cpu_s_per_1k_tokens": api_cpu / max(1, out_tokens) * 1e3,
        "core_cpu_s_per_1k_tokens": core_cpu / max(1, out_tokens) * 1e3,
        "engine_bound_output_tok_s": min(args.concurrency, args.max_num_seqs) / args.step_ms * 1e3,
    }  # fmt: skip


def _print(report: dict[str, Any]) -> None:
    profile = report.pop("profile", None)
    width = max(len(k) for k in report)
    for key, value in report.items():
        shown = f"{value:,.3f}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")
    for name, text in (profile or {}).items():
        print(f"\n== profile: {name} (top functions by own time)\n{text}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--step-ms", type=float, default=1.5, help="the fake engine step's duration")
    p.add_argument("--concurrency", type=int, default=128, help="streams open at once")
    p.add_argument("--max-num-seqs", type=int, default=256, help="the fake engine's batch limit")
    p.add_argument("--prompt-len", type=int, default=1000, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=265, help="output tokens per request")
    p.add_argument("--duration-s", type=float, default=20.0, help="how long the load runs")
    p.add_argument(
        "--client",
        choices=("lean", "bench"),
        default="lean",
        help="lean: raw sockets, no JSON per chunk; bench: bench serve's client",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="cProfile the API process's threads and the core (slows them down)",
    )
    p.add_argument("--profile-top", type=int, default=25, help="functions shown per profile")
    p.add_argument("--json", help="also write the report to this file")
    args = p.parse_args(argv)
    for name in ("step_ms", "duration_s"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("concurrency", "max_num_seqs", "prompt_len", "output_len", "profile_top"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    _print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
