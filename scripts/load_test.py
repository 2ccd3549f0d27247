#!/usr/bin/env python
"""Load and fault test of a parallm server: many concurrent streaming clients, some leaving
mid-stream; then checks that nothing leaked.

    python scripts/load_test.py                       # starts its own server on a tiny model
    python scripts/load_test.py --model PATH -- --device cuda --max-num-seqs 256
    python scripts/load_test.py --url http://127.0.0.1:8000 --api-key KEY

For ``--duration`` seconds, ``--clients`` clients each send streaming completions back to back;
every tenth client drops its connection after a few chunks. Afterwards it waits for the server
to go idle and reports errors, the KV blocks still held (must be 0: blocks kept only for the
prefix cache are free), and the server's resident memory before and after (from /metrics). It
exits 1 on any error, leaked block or excess memory growth. Loopback only, and bounded: at most
``MAX_CLIENTS`` clients and ``MAX_DURATION_S`` seconds, each request at most ``--max-tokens``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

MAX_CLIENTS = 1000
MAX_DURATION_S = 600
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
DISCONNECT_EVERY = 10  # every tenth client leaves mid-stream


@dataclass
class Tally:
    """What the clients saw."""

    completed: int = 0
    disconnected: int = 0
    tokens: int = 0
    errors: Counter = field(default_factory=Counter)
    error_examples: list[str] = field(default_factory=list)

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        if len(self.error_examples) < 5:
            self.error_examples.append(f"{kind}: {detail[:300]}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", help="a running server (loopback only); default: start one")
    p.add_argument("--model", help="model directory for the server this script starts")
    p.add_argument("--api-key", default=None, help="the server's API key, if it has one")
    p.add_argument("--clients", type=int, default=200, help="concurrent streaming clients")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per request")
    p.add_argument("--prompt-words", type=int, default=20, help="words per prompt (varied)")
    p.add_argument("--token-ids", action="store_true",
                   help="send prompts as token ids (for models without a tokenizer)")  # fmt: skip
    p.add_argument("--max-rss-growth-mb", type=float, default=512.0,
                   help="fail if the server's RSS grows more than this")  # fmt: skip
    p.add_argument("--idle-timeout", type=float, default=30.0,
                   help="seconds to wait for the server to go idle after the run")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed for prompts and disconnect points")
    p.add_argument("--json", type=Path, help="also write the report here")
    p.add_argument("serve_args", nargs="*", help="after --: extra `parallm serve` flags")
    args = p.parse_args(argv)
    if not 1 <= args.clients <= MAX_CLIENTS:
        p.error(f"--clients must be in [1, {MAX_CLIENTS}]")
    if not 0 < args.duration <= MAX_DURATION_S:
        p.error(f"--duration must be in (0, {MAX_DURATION_S}]")
    if not 1 <= args.max_tokens <= 4096:
        p.error("--max-tokens must be in [1, 4096]")
    if args.url and urlparse(args.url).hostname not in LOOPBACK:
        p.error(f"--url must be a loopback address ({sorted(LOOPBACK)}), got {args.url}")
    return args


# ---- the server ------------------------------------------------------------------------------


def start_server(args: argparse.Namespace, workdir: Path) -> tuple[subprocess.Popen, str]:
    """``parallm serve`` on 127.0.0.1:<free port>; a tiny random model unless --model."""
    model = args.model
    if model is None:
        from parallm.commands.tiny_model import make_tiny_model

        model = str(workdir / "tiny")
        make_tiny_model(Path(model), hidden_size=64, num_layers=2, vocab_size=512, seed=0)
    cmd = [sys.executable, "-m", "parallm", "serve", "--model", model, "--host", "127.0.0.1",
           "--port", "0", "--served-model-name", "load-test", "--log-level", "warning",
           "--max-num-waiting", str(args.clients * 2), *args.serve_args]  # fmt: skip
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        sys.stderr.write(line)
        if "serving on " in line:
            url = line.split("serving on ", 1)[1].strip().removesuffix("/v1")
            # Keep draining the server's stderr so that it never blocks on a full pipe.
            threading.Thread(target=_pump, args=(proc.stderr,), daemon=True).start()
            return proc, url
    raise SystemExit(f"the server did not start (exit code {proc.wait()})")


def _pump(stream) -> None:  # noqa: ANN001 - a text stream
    for line in stream:
        sys.stderr.write(line)


def wait_ready(url: str, timeout_s: float) -> None:
    """Wait until ``/health`` answers 200."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} did not become healthy within {timeout_s:.0f}s")
        time.sleep(0.2)


def read_metrics(url: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        match = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})? (\S+)$", line)
        if match and match.group(1) not in values:
            values[match.group(1)] = float(match.group(3))
    return values


def wait_idle(url: str, timeout_s: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        m = read_metrics(url)
        busy = m.get("parallm:num_requests_running", 0) + m.get("parallm:num_requests_waiting", 0)
        if (busy == 0 and m.get("parallm:kv_cache_blocks_in_use", 0) == 0) or (
            time.monotonic() > deadline
        ):
            return m
        time.sleep(0.1)


# ---- the clients -----------------------------------------------------------------------------

_WORDS = ["def", "class", "return", "import", "yield", "lambda", "value", "index", "count", "total", "result", "self", "data", "items", "key", "list", "dict", "print", "range", "open"]  # fmt: skip


async def model_name(http: httpx.AsyncClient, url: str) -> str:
    response = await http.get(url + "/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def one_request(
    http: httpx.AsyncClient, url: str, body: dict, leave_after: int | None, tally: Tally
) -> None:
    """One streaming completion; with ``leave_after``, drop the connection after that many
    chunks."""
    chunks = 0
    usage = None
    done = False
    async with http.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            tally.error(f"http {response.status_code}", (await response.aread()).decode())
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                tally.error("error event", data)
                return
            usage = event.get("usage") or usage
            chunks += 1
            if leave_after is not None and chunks >= leave_after:
                tally.disconnected += 1
                return  # leaving the block closes the connection mid-stream
    if not done:
        tally.error("no [DONE]", f"stream ended after {chunks} chunks")
    elif usage is None or usage["completion_tokens"] != body["max_tokens"]:
        tally.error("wrong usage", f"{usage} for max_tokens={body['max_tokens']}")
    else:
        tally.completed += 1
        tally.tokens += usage["completion_tokens"]


async def client_loop(
    index: int, http: httpx.AsyncClient, url: str, model: str, args: argparse.Namespace,
    deadline: float, tally: Tally,
) -> None:  # fmt: skip
    rng = random.Random(args.seed * 100_003 + index)
    leaves = index % DISCONNECT_EVERY == 0
    while time.monotonic() < deadline:
        num_words = rng.randint(1, args.prompt_words)
        if args.token_ids:
            prompt: str | list[int] = [rng.randrange(10, 1000) for _ in range(num_words)]
        else:
            prompt = " ".join(rng.choices(_WORDS, k=num_words))
        body = {"model": model, "prompt": prompt, "max_tokens": args.max_tokens,
                "stream": True, "stream_options": {"include_usage": True},
                "ignore_eos": True, "temperature": 1.0, "seed": rng.randrange(1 << 30)}  # fmt: skip
        leave_after = rng.randint(1, max(1, args.max_tokens // 2)) if leaves else None
        try:
            await one_request(http, url, body, leave_after, tally)
        except (httpx.HTTPError, json.JSONDecodeError) as e:
            tally.error(type(e).__name__, repr(e))


async def run_load(url: str, args: argparse.Namespace) -> Tally:
    tally = Tally()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients)
    timeout = httpx.Timeout(120.0, connect=30.0)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as http:
        model = await model_name(http, url)
        deadline = time.monotonic() + args.duration
        tasks = [
            asyncio.create_task(client_loop(i, http, url, model, args, deadline, tally))
            for i in range(args.clients)
        ]
        # Requests already running at the deadline get a bounded grace period to finish.
        _, late = await asyncio.wait(tasks, timeout=args.duration + 120.0)
        for task in late:
            task.cancel()
            tally.error("timeout", "a client was still busy after the grace period")
        await asyncio.gather(*late, return_exceptions=True)
    return tally


# ---- the report ------------------------------------------------------------------------------


def report(tally: Tally, before: dict, after: dict, seconds: float, args) -> tuple[dict, bool]:  # noqa: ANN001
    rss_before = before.get("process_resident_memory_bytes", 0) / 2**20
    rss_after = after.get("process_resident_memory_bytes", 0) / 2**20
    blocks_held = int(after.get("parallm:kv_cache_blocks_in_use", -1))
    result = {
        "clients": args.clients,
        "duration_s": round(seconds, 1),
        "requests_completed": tally.completed,
        "requests_disconnected": tally.disconnected,
        "output_tokens": tally.tokens,
        "output_tokens_per_s": round(tally.tokens / seconds, 1),
        "errors": dict(tally.errors),
        "error_examples": tally.error_examples,
        "kv_blocks_held_after": blocks_held,
        "kv_blocks_cached_for_prefix_reuse": int(after.get("parallm:prefix_cache_cached_blocks", 0)),
        "requests_running_after": int(after.get("parallm:num_requests_running", -1)),
        "requests_aborted_by_server": int(after.get("parallm:request_aborted_total", 0)
                                          - before.get("parallm:request_aborted_total", 0)),
        "server_rss_mb_before": round(rss_before, 1),
        "server_rss_mb_after": round(rss_after, 1),
    }  # fmt: skip
    ok = (
        not tally.errors
        and blocks_held == 0
        and result["requests_running_after"] == 0
        and tally.completed > 0
        and (tally.disconnected > 0 or args.clients < DISCONNECT_EVERY)
        and rss_after - rss_before <= args.max_rss_growth_mb
    )
    result["passed"] = ok
    return result, ok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    proc = None
    with tempfile.TemporaryDirectory(prefix="parallm-load-") as workdir:
        try:
            if args.url:
                url = args.url.rstrip("/").removesuffix("/v1")
            else:
                proc, url = start_server(args, Path(workdir))
            wait_ready(url, args.idle_timeout)
            before = wait_idle(url, args.idle_timeout)
            started = time.monotonic()
            tally = asyncio.run(run_load(url, args))
            seconds = time.monotonic() - started
            after = wait_idle(url, args.idle_timeout)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)
    result, ok = report(tally, before, after, seconds, args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    print("PASSED" if ok else "FAILED", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the server subprocess on a shared box
    sys.exit(main())
