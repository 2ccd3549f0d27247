"""``parallm bench serve``: load an OpenAI-compatible server (ours or another) with streaming
requests and report TTFT, TPOT, ITL, end-to-end latency, throughput and goodput.

Arrivals are Poisson at ``--request-rate`` or replayed from a trace (``--trace``, e.g. the Azure
LLM inference traces), compressed by ``--time-scale``. Each request asks for its output length
with ``ignore_eos`` and ``min_tokens`` (vLLM's extensions), so outputs have the workload's
lengths whatever the model says. Only the URL given is contacted; at most ``--num-requests``
requests are sent, and whatever is pending at ``--max-duration-s`` is cancelled.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
from pathlib import Path
from typing import Any

from tqdm import tqdm

from parallm.bench.common import environment, write_json
from parallm.bench.serve_client import ClientConfig, RequestResult, first_model, run_requests
from parallm.bench.serve_report import per_request, plot, print_report, summarize
from parallm.bench.serve_workload import (
    PromptMaker,
    RequestSpec,
    Shape,
    build_requests,
    load_trace,
    poisson_shapes,
    trace_shapes,
)

DEFAULT_OUTPUT_LEN = 128


def add_args(p: argparse.ArgumentParser) -> None:
    """The flags (``--out`` is added by ``parallm bench`` for every benchmark)."""
    _server_args(p.add_argument_group("server"))
    _arrival_args(p.add_argument_group("arrivals"))
    _prompt_args(p.add_argument_group("prompts and lengths"))
    _report_args(p.add_argument_group("run and report"))


def _server_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--base-url", required=True, help="server URL, e.g. http://127.0.0.1:8000")
    g.add_argument("--model", default=None, help="model name (default: first of /v1/models)")
    g.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    g.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="bearer token (default: $OPENAI_API_KEY)",
    )
    g.add_argument(
        "--no-vllm-extensions",
        action="store_true",
        help="do not send ignore_eos/min_tokens (for servers that reject them)",
    )


def _arrival_args(w: argparse._ArgumentGroup) -> None:
    w.add_argument("--num-requests", type=int, default=1000, help="most requests sent")
    w.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="Poisson arrivals per second; inf sends all at once (not with --trace)",
    )
    w.add_argument(
        "--trace", type=Path, default=None, help="CSV of TIMESTAMP,ContextTokens,GeneratedTokens"
    )
    w.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="replay the trace this many times faster (10: gaps / 10)",
    )
    w.add_argument(
        "--trace-offset-s", type=float, default=0.0, help="start this many seconds into the trace"
    )
    w.add_argument(
        "--trace-duration-s",
        type=float,
        default=None,
        help="replay this many seconds of the trace (trace time, before scaling)",
    )
    w.add_argument("--seed", type=int, default=0, help="seed of arrivals and prompts")


def _prompt_args(w: argparse._ArgumentGroup) -> None:
    w.add_argument("--input-len", type=int, default=256, help="synthetic prompt tokens")
    w.add_argument(
        "--output-len",
        type=int,
        default=None,
        help=f"synthetic output tokens (default {DEFAULT_OUTPUT_LEN}, or ShareGPT's reply length)",
    )
    w.add_argument("--max-input-tokens", type=int, default=None, help="cap on prompt tokens")
    w.add_argument("--max-output-tokens", type=int, default=None, help="cap on output tokens")
    w.add_argument(
        "--prompts",
        choices=["sonnet", "sharegpt", "random"],
        default=None,
        help="prompt source (default: random ids for completions, sonnet for chat)",
    )
    w.add_argument(
        "--prompts-file",
        type=Path,
        default=None,
        help="the sonnet text or ShareGPT JSON (default: ../shared/prompts)",
    )
    w.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer directory to size prompts in its tokens (default: token-id "
        "prompts, or 4 characters a token for text)",
    )
    w.add_argument(
        "--random-vocab-size",
        type=int,
        default=None,
        help="random ids are drawn below this (default: the tokenizer's size, else 256)",
    )


def _report_args(r: argparse._ArgumentGroup) -> None:
    r.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    r.add_argument(
        "--max-duration-s",
        type=float,
        default=600.0,
        help="hard limit; requests still pending then are cancelled",
    )
    r.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: TTFT limit")
    r.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput: TPOT limit")
    r.add_argument("--plot", type=Path, default=None, help="write latency plots to this PNG")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")


def api_base(url: str) -> str:
    """The OpenAI API root of a server URL: ``http://host:port`` or ``.../v1`` both work."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--base-url {url!r}: expected http:// or https://")
    return url if url.endswith("/v1") else url + "/v1"


def workload(args: argparse.Namespace) -> list[RequestSpec]:
    """The requests to send, at most ``--num-requests``."""
    if args.num_requests < 1:
        raise ValueError("--num-requests must be at least 1")
    rng = random.Random(args.seed)
    kind = args.prompts or ("sonnet" if args.endpoint == "chat" else "random")
    tokenizer = _tokenizer(args.tokenizer)
    maker = PromptMaker(
        kind, args.endpoint, rng, tokenizer, args.prompts_file, args.random_vocab_size
    )
    return build_requests(
        _shapes(args, rng), maker, DEFAULT_OUTPUT_LEN, args.max_input_tokens, args.max_output_tokens
    )


def _shapes(args: argparse.Namespace, rng: random.Random) -> list[Shape]:
    if args.trace is None:
        return poisson_shapes(
            args.num_requests, args.request_rate, args.input_len, args.output_len, rng
        )
    rows = load_trace(args.trace, args.trace_offset_s, args.trace_duration_s)
    if not rows:
        raise ValueError(f"{args.trace}: no request in the window chosen")
    return trace_shapes(rows[: args.num_requests], args.time_scale)


def _tokenizer(path: str | None) -> Any | None:
    if path is None:
        return None
    from parallm.tokenizer import load_tokenizer

    return load_tokenizer(path)


def benchmark(
    cfg: ClientConfig, specs: list[RequestSpec], progress: bool = True
) -> tuple[list[RequestResult], float]:
    """Run the requests with a progress bar; (results, seconds)."""
    with tqdm(total=len(specs), desc="requests", unit="req", disable=not progress) as bar:
        return asyncio.run(run_requests(cfg, specs, on_done=lambda result: bar.update(1)))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark end to end: workload, requests, table, JSON and plot; the JSON payload."""
    base = api_base(args.base_url)
    model = args.model or asyncio.run(first_model(base, args.api_key))
    specs = workload(args)
    cfg = ClientConfig(
        base_url=base,
        model=model,
        endpoint=args.endpoint,
        api_key=args.api_key,
        vllm_extensions=not args.no_vllm_extensions,
        max_concurrency=args.max_concurrency,
        max_duration_s=args.max_duration_s,
    )
    last = specs[-1].arrival_s if specs else 0.0
    print(
        f"bench serve: {len(specs)} requests to {cfg.url} (model {model}), "
        f"arrivals over {last:.1f} s"
    )
    results, seconds = benchmark(cfg, specs, progress=not args.no_progress)
    summary = summarize(results, seconds, args.slo_ttft_ms, args.slo_tpot_ms)
    print_report(summary)
    safe_args = {k: v for k, v in vars(args).items() if k not in ("func", "api_key")}
    payload = {
        "benchmark": "serve",
        "env": environment(),
        "model": model,
        "args": safe_args,
        "summary": summary,
        "requests": per_request(results),
    }
    write_json(getattr(args, "out", None), payload)
    if args.plot is not None:
        plot(results, args.plot, f"{model} @ {cfg.url}: {summary['completed']} requests")
    return payload
