"""``parallm serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) around one engine."""

from __future__ import annotations

import argparse
import logging
import sys

from parallm.commands.engine_args import add_engine_args, engine_kwargs
from parallm.server.limits import DEFAULT_MAX_REQUEST_BODY_BYTES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve /v1/completions, /v1/chat/completions (streaming or not), /v1/models, "
        "/tokenize, /detokenize, /version, /health, /ping and /metrics (and /start_profile, "
        "/stop_profile with --profiler-config). One engine loop batches "
        "all connections (with --data-parallel-size N: N engines, each request sent to the one "
        "that caches the longest prefix of it, else the least loaded). SIGTERM stops accepting, lets running requests finish (up to "
        "--drain-timeout), then exits.",
    )
    p.add_argument(
        "model_tag",
        nargs="?",
        metavar="MODEL",
        default=None,
        help="the model, as vLLM takes it: same as --model",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1")
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the model name clients use (unset: the --model given)",
    )
    p.add_argument(
        "--max-num-waiting",
        type=int,
        default=1024,
        help="most requests queued beyond the running ones; more get 429 with Retry-After",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds that SIGTERM waits for running requests before aborting them; an "
        'aborted stream ends with finish_reason "abort" and [DONE]',
    )
    p.add_argument(
        "--max-request-body-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BODY_BYTES,
        help="largest request body accepted, in bytes; a larger one gets 413 before it is read",
    )
    p.add_argument(
        "--log-level",
        "--uvicorn-log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's log level",
    )
    p.add_argument(
        "--disable-log-requests",
        action="store_true",
        help="do not log a line per request (uvicorn's access log)",
    )
    p.add_argument(
        "--disable-log-stats",
        action="store_true",
        help="do not log the throughput / running / waiting / KV cache / prefix cache hit rate "
        "line that the server logs every 10 s while busy",
    )
    p.add_argument(
        "--disable-frontend-multiprocessing",
        action="store_true",
        help="run the engine on a thread of the API server's process instead of in its own "
        "engine-core process (unset, the engine core runs apart, so that HTTP, tokenization "
        "and streaming do not share a GIL with the step loop)",
    )
    add_engine_args(p)
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_num_waiting < 0:
        raise ValueError(f"--max-num-waiting must be >= 0, got {args.max_num_waiting}")
    if args.drain_timeout < 0:
        raise ValueError(f"--drain-timeout must be >= 0 seconds, got {args.drain_timeout}")
    if args.max_request_body_bytes < 1:
        raise ValueError(
            f"--max-request-body-bytes must be >= 1, got {args.max_request_body_bytes}"
        )
    if args.disable_frontend_multiprocessing and args.data_parallel_size > 1:
        raise ValueError(
            "--data-parallel-size above 1 runs one engine-core process per replica; it cannot "
            f"be combined with --disable-frontend-multiprocessing (got {args.data_parallel_size})"
        )


def _default_name(model: str) -> str:
    from parallm.bundled import BUNDLED_MODEL_DIR, BUNDLED_MODEL_NAME

    return BUNDLED_MODEL_NAME if model == str(BUNDLED_MODEL_DIR) else model


def _take_positional_model(args: argparse.Namespace) -> None:
    """``parallm serve MODEL`` is ``--model MODEL``; both at once must agree."""
    if args.model_tag is None:
        return
    if args.model is not None and args.model != args.model_tag:
        raise ValueError(
            f"the model is given twice and differs: MODEL {args.model_tag!r} and --model "
            f"{args.model!r}; give one"
        )
    args.model = args.model_tag


def run(args: argparse.Namespace) -> int:
    _check(args)
    _take_positional_model(args)
    kwargs = engine_kwargs(args)
    from parallm.server.app import build_app
    from parallm.server.launcher import engine_failure, load_engine, run_server, start_engine_cores

    if args.disable_frontend_multiprocessing:
        engine = load_engine(**kwargs)
        print(engine.summary(), file=sys.stderr)
    else:
        from parallm.engine.core.client import EngineCoreError

        try:
            cores = start_engine_cores(**kwargs)
        except EngineCoreError as e:
            print(f"parallm serve: error: {e}", file=sys.stderr)
            return 1
        summary = cores[0].info.summary
        if len(cores) > 1:
            summary = f"data_parallel_size={len(cores)}, each replica: {summary}"
        print(summary, file=sys.stderr)
        engine = cores if len(cores) > 1 else cores[0]
    # The server's INFO lines (the stats log) show by default; set after loading, whose INFO
    # summary line is printed just above.
    logging.getLogger("parallm").setLevel(logging.INFO)
    name = args.served_model_name or args.model or _default_name(kwargs["model"])
    app = build_app(
        engine, name, args.api_key, args.max_num_waiting, log_stats=not args.disable_log_stats,
        max_request_body_bytes=args.max_request_body_bytes,
    )  # fmt: skip
    print(f"parallm: model name {name!r}", file=sys.stderr)
    run_server(
        app, args.host, args.port, args.drain_timeout, args.log_level,
        access_log=not args.disable_log_requests,
    )  # fmt: skip
    failure = engine_failure(app)
    if failure is not None:
        print(f"parallm serve: error: {failure}", file=sys.stderr)
        return 1
    return 0
