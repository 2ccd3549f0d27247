"""``parallm bench latency|throughput|train|serve``: benchmarks printing a table and JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

from parallm.commands.engine_args import add_engine_args, engine_kwargs

_KINDS = {
    "latency": "decode speed at fixed batch sizes, against the memory-bandwidth roofline",
    "throughput": "the standard offline workload (256 requests, lengths in [100, 1024])",
    "train": "training tokens/s and MFU of a model shape on random tokens (torchrun: many GPUs)",
    "serve": "load a running OpenAI-compatible server by URL: TTFT, TPOT, ITL, goodput",
}

# Kinds that build their own model instead of an inference engine: they take no engine flags
# (train's --config and --dtype mean something else) and their run(args) gets no LLM. serve
# drives a server over HTTP, so it builds no engine either (its --model names the served model).
_NO_ENGINE = {"train", "serve"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark", description="Benchmarks of the engine.")
    kinds = p.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    for name, help_text in _KINDS.items():
        k = kinds.add_parser(name, help=help_text, description=help_text)
        module = _module(name)
        module.add_args(k)
        k.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
        if name not in _NO_ENGINE:
            add_engine_args(k)
        k.set_defaults(func=run)


def _module(name: str):  # noqa: ANN202 - a module
    from parallm.bench import latency, serve, throughput, train

    return {"latency": latency, "throughput": throughput, "train": train, "serve": serve}[name]


def run(args: argparse.Namespace) -> int:
    if args.bench in _NO_ENGINE:
        _module(args.bench).run(args)
        return 0
    from parallm import LLM

    if getattr(args, "compare_vllm", False):
        from parallm.bench.vllm_peer import check_comparable, require_vllm

        check_comparable(args)
        require_vllm()  # before the engine starts: a missing vLLM fails in seconds, not after it
    # No local reference: throughput --compare-hf frees the engine before loading transformers.
    _module(args.bench).run(args, LLM(**engine_kwargs(args)))
    _close_tensor_parallel_workers()
    return 0


def _close_tensor_parallel_workers() -> None:
    """A tensor-parallel engine's workers and process group end with the benchmark, not at
    interpreter exit (``main`` may run again in this process)."""
    from parallm.engine.executor import close_open_executors

    close_open_executors()
