"""``parallm bench latency|throughput``: benchmarks that print a table and write JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

from parallm.commands.engine_args import add_engine_args, engine_kwargs

_KINDS = {
    "latency": "decode speed at fixed batch sizes, against the memory-bandwidth roofline",
    "throughput": "the standard offline workload (256 requests, lengths in [100, 1024])",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark", description="Benchmarks of the engine.")
    kinds = p.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    for name, help_text in _KINDS.items():
        k = kinds.add_parser(name, help=help_text, description=help_text)
        module = _module(name)
        module.add_args(k)
        k.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
        add_engine_args(k)
        k.set_defaults(func=run)


def _module(name: str):  # noqa: ANN202 - a module
    from parallm.bench import latency, throughput

    return {"latency": latency, "throughput": throughput}[name]


def run(args: argparse.Namespace) -> int:
    from parallm import LLM

    llm = LLM(**engine_kwargs(args))
    _module(args.bench).run(args, llm)
    return 0
