"""``parallm bench serve``: load an OpenAI-compatible server (ours or another) with streaming
requests and report TTFT, TPOT, ITL, end-to-end latency, throughput and goodput.

The flags follow ``vllm bench serve``. Prompts come from ``--dataset-name``: random token ids of
``--random-input-len`` (the default; no file needed), ShareGPT conversations or sonnet text
(``--dataset-path``), or a trace (``--dataset-path`` or ``--trace``, e.g. the Azure LLM
inference traces) whose arrival times and lengths are replayed, compressed by ``--time-scale``.
Without a trace, arrivals come at ``--request-rate`` with gamma-distributed gaps
(``--burstiness`` 1 is Poisson). Each request asks for its output length with ``ignore_eos``
and ``min_tokens`` (vLLM's extensions), so outputs have the workload's lengths whatever the
model says. Only the URL given is contacted; at most ``--num-prompts`` requests are sent, and
whatever is pending at ``--max-duration-s`` is cancelled.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from parallm.bench.common import environment, write_json
from parallm.bench.serve_client import ClientConfig, RequestResult, first_model, run_requests
from parallm.bench.serve_report import (
    METRIC_ALIASES,
    METRICS,
    per_request,
    plot,
    print_report,
    summarize,
)
from parallm.bench.serve_workload import (
    PromptMaker,
    RequestSpec,
    Shape,
    build_requests,
    load_trace,
    synthetic_shapes,
    trace_shapes,
)

DATASETS = ("random", "sharegpt", "sonnet", "trace")
SLO_METRICS = ("ttft", "tpot", "e2el")  # what --goodput takes (vLLM's names)


def add_args(p: argparse.ArgumentParser) -> None:
    """The flags (``--out`` is added by ``parallm bench`` for every benchmark)."""
    _server_args(p.add_argument_group("server"))
    _dataset_args(p.add_argument_group("dataset"))
    _arrival_args(p.add_argument_group("arrivals"))
    _report_args(p.add_argument_group("run and report"))


def _server_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--base-url", required=True, help="server URL, e.g. http://127.0.0.1:8000")
    g.add_argument("--model", default=None, help="model name (unset: the first of /v1/models)")
    g.add_argument(
        "--endpoint",
        choices=["completions", "chat"],
        default="completions",
        help="/v1/completions or /v1/chat/completions",
    )
    g.add_argument("--api-key", default=None, help="bearer token (unset: $OPENAI_API_KEY)")
    g.add_argument(
        "--no-vllm-extensions",
        action="store_true",
        help="do not send ignore_eos/min_tokens (for servers that reject them)",
    )
    g.add_argument(
        "--temperature",
        type=temperature,
        default=0.0,
        help="sampling temperature of every request: 0 is greedy, as in the offline "
        "benchmarks and vLLM's bench serve; 1.0 is OpenAI's API's",
    )


def _dataset_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--dataset-name",
        "--prompts",
        choices=DATASETS,
        default="random",
        help="random: token ids of --random-input-len (no file needed); sharegpt, sonnet: "
        "prompts from the file at --dataset-path; trace: arrival times and lengths from the "
        "CSV at --dataset-path, with random prompts. With --trace, names the prompts' source",
    )
    g.add_argument(
        "--dataset-path",
        "--prompts-file",
        type=Path,
        default=None,
        help="the dataset's file: ShareGPT JSON, sonnet text or trace CSV",
    )
    g.add_argument(
        "--trace",
        type=Path,
        default=None,
        help="replay this CSV of TIMESTAMP,ContextTokens,GeneratedTokens (arrival times and "
        "lengths), with --dataset-name's prompts",
    )
    g.add_argument(
        "--num-prompts",
        "--num-requests",
        dest="num_prompts",
        type=int,
        default=1000,
        help="requests to send (at most this many trace rows)",
    )
    g.add_argument(
        "--random-input-len",
        "--input-len",
        dest="random_input_len",
        type=int,
        default=1024,
        help="prompt tokens of random and sonnet prompts",
    )
    g.add_argument(
        "--random-output-len",
        "--output-len",
        dest="random_output_len",
        type=int,
        default=128,
        help="output tokens of random and sonnet requests, and of ShareGPT ones without a reply",
    )
    g.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="random and sonnet lengths are drawn uniformly from [LEN * (1 - R), LEN * (1 + R)]",
    )
    g.add_argument(
        "--sharegpt-output-len",
        type=int,
        default=None,
        help="output tokens of ShareGPT requests (unset: the length of the conversation's reply)",
    )
    g.add_argument(
        "--max-input-tokens", type=int, default=None, help="cap on prompt tokens (unset: none)"
    )
    g.add_argument(
        "--max-output-tokens", type=int, default=None, help="cap on output tokens (unset: none)"
    )
    g.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer directory to size prompts in its tokens (unset: token-id prompts, or "
        "4 characters a token for text)",
    )
    g.add_argument(
        "--random-vocab-size",
        type=int,
        default=None,
        help="random ids are drawn below this (unset: the tokenizer's size, else 256)",
    )


def _arrival_args(w: argparse._ArgumentGroup) -> None:
    w.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="arrivals per second; inf sends all at once (not with a trace)",
    )
    w.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="shape of the gamma-distributed gaps between arrivals: 1 is a Poisson process, "
        "lower is burstier, higher more even (not with a trace)",
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
        help="replay this many seconds of the trace, trace time before scaling (unset: all)",
    )
    w.add_argument("--seed", type=int, default=0, help="seed of arrivals, lengths and prompts")


def _report_args(r: argparse._ArgumentGroup) -> None:
    r.add_argument(
        "--max-concurrency",
        type=int,
        default=None,
        help="most requests in flight (unset: no limit)",
    )
    r.add_argument(
        "--max-duration-s",
        type=float,
        default=600.0,
        help="hard limit; requests still pending then are cancelled",
    )
    r.add_argument(
        "--goodput",
        nargs="+",
        type=goodput_target,
        default=None,
        metavar="METRIC:MS",
        help=f"goodput counts requests within every limit given, e.g. ttft:500 tpot:50 "
        f"(metrics: {', '.join(SLO_METRICS)})",
    )
    r.add_argument("--slo-ttft-ms", type=float, default=None, help="same as --goodput ttft:MS")
    r.add_argument("--slo-tpot-ms", type=float, default=None, help="same as --goodput tpot:MS")
    r.add_argument(
        "--percentile-metrics",
        type=percentile_metrics,
        default="ttft,tpot,itl,e2el",
        help="metrics to report percentiles of, separated by commas (ttft, tpot, itl, e2el)",
    )
    r.add_argument(
        "--metric-percentiles",
        type=metric_percentiles,
        default="50,90,99",
        help="percentiles to report, separated by commas",
    )
    r.add_argument(
        "--save-result",
        action="store_true",
        help="write the results as JSON to --result-dir/--result-filename",
    )
    r.add_argument(
        "--save-detailed",
        action="store_true",
        help="the JSON (--out, --save-result) also holds each request's inter-token gaps "
        "(itl_s), for benchmarks/serve_gaps.py",
    )
    r.add_argument(
        "--result-dir",
        type=Path,
        default=None,
        help="folder of the --save-result file (unset: the current one)",
    )
    r.add_argument(
        "--result-filename",
        default=None,
        help="name of the --save-result file (unset: ENDPOINT-RATEqps-MODEL-DATE-TIME.json)",
    )
    r.add_argument("--plot", type=Path, default=None, help="write latency plots to this PNG")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")


# ---- flag values ------------------------------------------------------------------------------


def goodput_target(text: str) -> tuple[str, float]:
    """``"ttft:500"`` -> ``("ttft", 500.0)``: a metric of ``SLO_METRICS`` and a limit in ms."""
    name, sep, value = text.partition(":")
    if not sep or name.strip().lower() not in SLO_METRICS:
        raise argparse.ArgumentTypeError(
            f"expected METRIC:MS with METRIC one of {', '.join(SLO_METRICS)}; got {text!r}"
        )
    try:
        limit = float(value)
    except ValueError:
        limit = -1.0
    if not limit > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the limit must be a positive number of ms")
    return name.strip().lower(), limit


def temperature(text: str) -> float:
    """A sampling temperature: a number >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a temperature >= 0 (0: greedy); got {text!r}")
    return value


def percentile_metrics(text: str) -> tuple[str, ...]:
    """``"ttft,e2el"`` -> the report's metric names (``("ttft", "e2e")``), in its order."""
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in METRIC_ALIASES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"expected metrics separated by commas from ttft, tpot, itl, e2el; got {text!r}"
        )
    chosen = {METRIC_ALIASES[n] for n in names}
    return tuple(m for m in METRICS if m in chosen)


def metric_percentiles(text: str) -> tuple[float, ...]:
    """``"50,90,99"`` -> ``(50.0, 90.0, 99.0)``, each in [0, 100]."""
    try:
        values = tuple(sorted({float(part) for part in text.split(",")}))
    except ValueError:
        values = ()
    if not values or not all(0 <= v <= 100 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected percentiles in [0, 100] separated by commas, e.g. 50,90,99; got {text!r}"
        )
    return values


def slo_limits(args: argparse.Namespace) -> dict[str, float | None]:
    """The goodput limits in ms by report metric (ttft, tpot, e2e), from --goodput and the
    --slo-*-ms flags (which must agree where both are given)."""
    given = dict(args.goodput or [])
    for name, flag_value in (("ttft", args.slo_ttft_ms), ("tpot", args.slo_tpot_ms)):
        if flag_value is None:
            continue
        if name in given and given[name] != flag_value:
            raise ValueError(
                f"--goodput {name}:{given[name]:g} and --slo-{name}-ms {flag_value:g} disagree"
            )
        given[name] = flag_value
    return {"ttft": given.get("ttft"), "tpot": given.get("tpot"), "e2e": given.get("e2el")}


# ---- the workload -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    """Where a run's requests come from: prompts of one kind, and a trace or none."""

    prompts: str  # random, sharegpt or sonnet
    prompts_file: Path | None
    trace: Path | None


def dataset(args: argparse.Namespace) -> Dataset:
    """The dataset the flags name, its files checked to exist (before anything is sent)."""
    name, path, trace = args.dataset_name, args.dataset_path, args.trace
    if name == "trace":
        if trace is not None and path is not None and trace != path:
            raise ValueError(f"two traces given: --trace {trace} and --dataset-path {path}")
        trace = trace or path
        if trace is None:
            raise ValueError(
                "--dataset-name trace needs --dataset-path (or --trace): a CSV of "
                "TIMESTAMP,ContextTokens,GeneratedTokens"
            )
        return Dataset("random", None, _existing("the trace", trace))
    if name == "random" and path is not None:
        raise ValueError(
            f"--dataset-path {path} is not used by --dataset-name random (it needs no file); "
            "name the dataset it holds: sharegpt, sonnet or trace"
        )
    if name != "random" and path is None:
        raise ValueError(
            f"--dataset-name {name} needs --dataset-path: the "
            f"{'ShareGPT JSON' if name == 'sharegpt' else 'sonnet text'}"
        )
    prompts_file = _existing(f"the {name} file", path) if path is not None else None
    return Dataset(name, prompts_file, _existing("the trace", trace) if trace else None)


def _existing(what: str, path: Path) -> Path:
    if not path.is_file():
        raise ValueError(f"{what} {path}: no such file")
    return path


def workload(args: argparse.Namespace) -> list[RequestSpec]:
    """The requests to send, at most ``--num-prompts``."""
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be at least 1, got {args.num_prompts}")
    data = dataset(args)
    rng = random.Random(args.seed)
    maker = PromptMaker(
        data.prompts, args.endpoint, rng, _tokenizer(args.tokenizer), data.prompts_file,
        args.random_vocab_size,
    )  # fmt: skip
    return build_requests(
        _shapes(args, data, rng), maker, args.random_output_len, args.max_input_tokens,
        args.max_output_tokens,
    )  # fmt: skip


def _shapes(args: argparse.Namespace, data: Dataset, rng: random.Random) -> list[Shape]:
    if data.trace is None:
        output_len = (
            args.sharegpt_output_len if data.prompts == "sharegpt" else args.random_output_len
        )
        return synthetic_shapes(
            args.num_prompts, args.request_rate, args.random_input_len, output_len, rng,
            args.burstiness, args.random_range_ratio,
        )  # fmt: skip
    rows = load_trace(data.trace, args.trace_offset_s, args.trace_duration_s)
    if not rows:
        raise ValueError(f"{data.trace}: no request in the window chosen")
    return trace_shapes(rows[: args.num_prompts], args.time_scale)


def _tokenizer(path: str | None) -> Any | None:
    if path is None:
        return None
    from parallm.tokenizer import load_tokenizer

    return load_tokenizer(path)


# ---- the run ----------------------------------------------------------------------------------


def api_base(url: str) -> str:
    """The OpenAI API root of a server URL: ``http://host:port`` or ``.../v1`` both work."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--base-url {url!r}: expected http:// or https://")
    return url if url.endswith("/v1") else url + "/v1"


def benchmark(
    cfg: ClientConfig, specs: list[RequestSpec], progress: bool = True
) -> tuple[list[RequestResult], float]:
    """Run the requests with a progress bar; (results, seconds)."""
    with tqdm(total=len(specs), desc="requests", unit="req", disable=not progress) as bar:
        return asyncio.run(run_requests(cfg, specs, on_done=lambda result: bar.update(1)))


def result_file(args: argparse.Namespace, model: str) -> Path | None:
    """Where --save-result writes: --result-dir / (--result-filename or a name like vLLM's)."""
    if not args.save_result:
        return None
    name = args.result_filename
    if name is None:
        concurrency = f"-concurrency{args.max_concurrency}" if args.max_concurrency else ""
        model_id = re.sub(r"[^A-Za-z0-9._-]+", "_", model.rstrip("/").split("/")[-1])
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = f"{args.endpoint}-{args.request_rate:g}qps{concurrency}-{model_id}-{stamp}.json"
    return (args.result_dir or Path(".")) / name


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark end to end: workload, requests, table, JSON and plot; the JSON payload."""
    base = api_base(args.base_url)
    slo = slo_limits(args)
    specs = workload(args)  # bad flags and missing files fail here, before any request
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    model = args.model or asyncio.run(first_model(base, api_key))
    cfg = ClientConfig(
        base_url=base,
        model=model,
        endpoint=args.endpoint,
        api_key=api_key,
        vllm_extensions=not args.no_vllm_extensions,
        temperature=args.temperature,
        max_concurrency=args.max_concurrency,
        max_duration_s=args.max_duration_s,
    )
    last = specs[-1].arrival_s if specs else 0.0
    print(
        f"bench serve: {len(specs)} requests to {cfg.url} (model {model}), "
        f"arrivals over {last:.1f} s"
    )
    results, seconds = benchmark(cfg, specs, progress=not args.no_progress)
    summary = summarize(
        results, seconds, slo["ttft"], slo["tpot"], slo["e2e"], args.percentile_metrics,
        args.metric_percentiles,
    )  # fmt: skip
    print_report(summary)
    safe_args = {k: v for k, v in vars(args).items() if k not in ("func", "api_key")}
    payload = {
        "benchmark": "serve",
        "env": environment(),
        "model": model,
        "args": safe_args,
        "summary": summary,
        "requests": per_request(results, detailed=args.save_detailed),
    }
    write_json(getattr(args, "out", None), payload)
    write_json(result_file(args, model), payload)
    if args.plot is not None:
        plot(results, args.plot, f"{model} @ {cfg.url}: {summary['completed']} requests")
    return payload
