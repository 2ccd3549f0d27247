"""Decode steps that carry a new prompt, against pure decode steps, in parallm or in vLLM.

Under a serving load most engine steps carry a newly arrived prompt beside the running decodes
(RESULTS, fourteenth session: parallm's TPOT under the Azure trace is 2.4x vLLM's while its pure
decode step is faster). This holds ``B`` requests decoding, then times ``N`` engine steps twice:
with nothing arriving (pure decode) and with one new ``P``-token request (``max_tokens=1``)
added before every step (mixed). Both engines are driven the same way, one step a call
(parallm's ``LLMEngine.step``; vLLM's ``LLMEngine.step`` with its engine core in this process,
``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so a ``torch.profiler`` over a few mixed steps counts
the kernel and graph launches and the device's busy time in either:

    python benchmarks/mixed_step_bench.py --config benchmarks/configs/qwen3-0.6b.json
    python benchmarks/mixed_step_bench.py --config benchmarks/configs/qwen3-0.6b.json --engine vllm

Dummy weights, greedy, EOS ignored; each arrival's prompt is fresh random ids (no prefix hit).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # its neighbours

from trace_contexts import draw_contexts, trace_requests  # noqa: E402

from parallm.bench.latency import batch_sizes as positive_ints  # noqa: E402

# CUDA runtime and driver calls that start device work: what "launches" counts a step.
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                "cudaGraphLaunch", "cudaMemcpyAsync")  # fmt: skip
TOP_KERNELS = 8  # kernels a profiled row lists


class ParallmSteps:
    """parallm's engine, one step a call."""

    name = "parallm"

    def __init__(self, args: argparse.Namespace) -> None:
        from parallm import LLM, SamplingParams

        self.llm = LLM(args.config, load_format="dummy", max_model_len=args.max_model_len,
                       seed=0, gpu_memory_utilization=args.gpu_memory_utilization)  # fmt: skip
        self.engine = self.llm.engine
        print(self.engine.summary(), file=sys.stderr)  # which steps replay graphs
        self.params = SamplingParams
        self.vocab = self.engine.model_config.vocab_size

    def add(self, request_id: str, prompt: list[int], max_tokens: int) -> None:
        params = self.params(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        self.engine.add_request(request_id, prompt, params)

    def step(self) -> None:
        self.engine.step()

    def abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.engine.abort_request(request_id)

    def unfinished(self) -> bool:
        return self.engine.has_unfinished_requests()


class VllmSteps:
    """vLLM's engine with its engine core in this process, one step a call."""

    name = "vllm"

    def __init__(self, args: argparse.Namespace) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the core's steps in this process
        from parallm.bench.vllm_peer import child_env

        for key, value in child_env().items():  # no flashinfer sampler, no usage reports
            os.environ.setdefault(key, value)
        import vllm

        self.scratch = Path(tempfile.mkdtemp(prefix="mixed-step-vllm-"))
        shutil.copyfile(args.config, self.scratch / "config.json")  # vLLM takes a folder
        limits = {} if args.vllm_config == "stock" else parallm_limits(args.max_model_len)
        self.llm = vllm.LLM(model=str(self.scratch), load_format="dummy", dtype="bfloat16",
                            skip_tokenizer_init=True, max_model_len=args.max_model_len, seed=0,
                            gpu_memory_utilization=args.gpu_memory_utilization, **limits)  # fmt: skip
        self.engine = self.llm.llm_engine
        self.params = vllm.SamplingParams
        self.vocab = json.loads(Path(args.config).read_text())["vocab_size"]

    def add(self, request_id: str, prompt: list[int], max_tokens: int) -> None:
        params = self.params(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                             detokenize=False)  # fmt: skip
        self.engine.add_request(request_id, {"prompt_token_ids": prompt}, params)

    def step(self) -> None:
        self.engine.step()

    def abort(self, request_ids: list[str]) -> None:
        self.engine.abort_request(request_ids)

    def unfinished(self) -> bool:
        return self.engine.has_unfinished_requests()


def parallm_limits(max_model_len: int) -> dict[str, Any]:
    """parallm's scheduler limits by vLLM's names (``--vllm-config parallm-limits``), from
    parallm's own defaults, as ``bench throughput --compare-vllm`` gives them; the memory
    share stays ``--gpu-memory-utilization``, the same for both engines here."""
    from parallm.bench.vllm_peer import vllm_limits
    from parallm.config import EngineConfig

    limits = vllm_limits(EngineConfig(), max_model_len)
    del limits["gpu_memory_utilization"]
    return limits


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


_ids = itertools.count()


def _prompt(rng: random.Random, vocab: int, length: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(length)]


def timed_steps(engine: Any, steps: int, arrival_len: int, rng: random.Random) -> float:
    """Milliseconds a step over ``steps`` steps; ``arrival_len`` > 0 adds one request of that
    many fresh prompt tokens (one output token) before every step."""
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        if arrival_len:
            engine.add(f"arrival-{next(_ids)}", _prompt(rng, engine.vocab, arrival_len), 1)
        engine.step()
    sync()
    return (time.perf_counter() - start) / steps * 1e3


def profiled_steps(engine: Any, steps: int, arrival_len: int, rng: random.Random) -> dict:
    """Kernel and graph launches and device-busy milliseconds a step, from ``torch.profiler``
    over ``steps`` steps, and the ``TOP_KERNELS`` kernels with the most device time (ms a
    step, by name; kernels replayed inside CUDA graphs count too)."""
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        timed_steps(engine, steps, arrival_len, rng)
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in LAUNCH_CALLS)
    device_us = sum(e.self_device_time_total for e in events)
    busy = sorted((e for e in events if e.self_device_time_total > 0),
                  key=lambda e: -e.self_device_time_total)[:TOP_KERNELS]  # fmt: skip
    kernels = {e.key: e.self_device_time_total / steps / 1e3 for e in busy}
    return {"launches_per_step": launches / steps, "device_ms_per_step": device_us / steps / 1e3,
            "kernels": kernels}  # fmt: skip


def decode_contexts(args: argparse.Namespace, batch: int) -> list[int]:
    """The decoding requests' prompt lengths: ``--context-len`` each, or drawn from the trace
    (``--contexts-from``) and capped at it. The draws depend only on the seed and the batch, so
    every engine and tree gets the same contexts."""
    if args.contexts_from is None:
        return [args.context_len] * batch
    rng = np.random.default_rng([args.seed, batch])
    return [min(c, args.context_len) for c in draw_contexts(*args.trace, batch, rng)]


def measure(engine: Any, args: argparse.Namespace, batch: int, rng: random.Random) -> list[dict]:
    """One batch size: ``batch`` requests decoding, then each arrival length's rows."""
    running = [f"decode-{next(_ids)}" for _ in range(batch)]
    lens = decode_contexts(args, batch)
    for request_id, length in zip(running, lens, strict=True):
        engine.add(request_id, _prompt(rng, engine.vocab, length), args.max_tokens)
    for _ in range(sum(lens) // 2048 + 4):  # every prompt in, decoding
        engine.step()
    rows = []
    for arrival_len in args.arrival_lens:
        timed_steps(engine, args.warmup_steps, arrival_len, rng)  # new shapes compile here
        row = {"engine": engine.name, "batch_size": batch, "arrival_len": arrival_len,
               "context_mean": sum(lens) / batch, "context_max": max(lens),
               "decode_ms": timed_steps(engine, args.steps, 0, rng),
               "mixed_ms": timed_steps(engine, args.steps, arrival_len, rng)}  # fmt: skip
        if args.profile_steps:
            # The pure decode step's profile beside the mixed one: where the mixed step's
            # extra time goes, kernel by kernel.
            decode = profiled_steps(engine, args.profile_steps, 0, rng)["kernels"]
            row |= profiled_steps(engine, args.profile_steps, arrival_len, rng)
            row["decode_kernels"] = decode
        rows.append(row)
        print(_line(row), flush=True)
        for line in _kernel_lines(row):
            print(line, flush=True)
    engine.abort(running)
    while engine.unfinished():
        engine.step()
    return rows


def _line(row: dict) -> str:
    text = (f"{row['engine']:>8} batch {row['batch_size']:4d} (contexts mean "
            f"{row['context_mean']:.0f}, max {row['context_max']}) arrival {row['arrival_len']:5d} "
            f"tokens: decode {row['decode_ms']:7.3f} ms/step, mixed {row['mixed_ms']:7.3f} "
            f"({row['mixed_ms'] / row['decode_ms']:.2f}x)")  # fmt: skip
    if "launches_per_step" in row:
        text += (f"; profiled mixed: {row['launches_per_step']:.0f} launches, "
                 f"{row['device_ms_per_step']:.3f} device ms a step")  # fmt: skip
    return text


def _kernel_lines(row: dict) -> list[str]:
    """The mixed step's busiest kernels, with the pure decode step's time in each (ms a
    step), then the decode step's busiest ones that the mixed step does not run."""
    mixed, decode = row.get("kernels", {}), row.get("decode_kernels", {})
    names = [*mixed, *(k for k in decode if k not in mixed)]
    return [f"      {name[:64]:<64} mixed {mixed.get(name, 0):7.3f}  decode "
            f"{decode.get(name, 0):7.3f}" for name in names]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--config", required=True, help="a model shape's config.json (dummy weights)")
    p.add_argument("--engine", choices=("parallm", "vllm"), default="parallm",
                   help="the engine to drive (vllm: importable here, its core in this process)")  # fmt: skip
    p.add_argument("--vllm-config", choices=("stock", "parallm-limits"), default="parallm-limits",
                   help="with --engine vllm: its own scheduler limits, or parallm's")  # fmt: skip
    p.add_argument("--batch-sizes", type=positive_ints, default=positive_ints("16,64,128"),
                   help="requests decoding, separated by commas")  # fmt: skip
    p.add_argument("--arrival-lens", type=positive_ints, default=positive_ints("32,512"),
                   help="prompt tokens of the request arriving before each mixed step")  # fmt: skip
    p.add_argument("--context-len", type=int, default=128,
                   help="the decoding requests' prompts (with --contexts-from, their cap)")  # fmt: skip
    p.add_argument(
        "--contexts-from",
        type=Path,
        default=None,
        help="an Azure trace CSV (ContextTokens, GeneratedTokens): each batch's "
        "decoding requests are consecutive requests of it, part way through their "
        "outputs, as a serving batch holds them (default: one shared --context-len)",
    )
    p.add_argument("--seed", type=int, default=0, help="the draws from --contexts-from")
    p.add_argument("--steps", type=int, default=64, help="timed steps of each kind")
    p.add_argument("--warmup-steps", type=int, default=16, help="untimed mixed steps first")
    p.add_argument("--profile-steps", type=int, default=8,
                   help="mixed steps under torch.profiler a row (0: none)")  # fmt: skip
    p.add_argument("--max-model-len", type=int, default=4096, help="context limit")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                   help="share of the GPU's memory the engine may take")  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for flag in ("context_len", "steps", "warmup_steps"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be at least 1")
    if args.profile_steps < 0:
        raise SystemExit("--profile-steps must be 0 or more")
    if args.contexts_from is not None:
        if not args.contexts_from.is_file():
            raise SystemExit(f"--contexts-from: no file {args.contexts_from}")
        args.trace = trace_requests(args.contexts_from)
        if len(args.trace[0]) <= max(args.batch_sizes):
            raise SystemExit(f"--contexts-from: {len(args.trace[0])} requests in "
                             f"{args.contexts_from}, fewer than the largest batch")  # fmt: skip
    # The decoding requests must outlast every timed and profiled step of every arrival length.
    steps = len(args.arrival_lens) * (args.warmup_steps + 2 * args.steps + 2 * args.profile_steps)
    args.max_tokens = steps + max(args.batch_sizes) * args.context_len // 2048 + 16
    if args.context_len + args.max_tokens > args.max_model_len:
        raise SystemExit(f"--context-len {args.context_len} plus {args.max_tokens} decode steps "
                         f"pass --max-model-len {args.max_model_len}: fewer --steps")  # fmt: skip
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    engine = (VllmSteps if args.engine == "vllm" else ParallmSteps)(args)
    rng = random.Random(0)
    rows = [row for batch in args.batch_sizes for row in measure(engine, args, batch, rng)]
    if args.out:
        args.out.write_text(json.dumps({"config": args.config, "engine": args.engine,
                                        "vllm_config": args.vllm_config if args.engine == "vllm" else None,
                                        "contexts_from": args.contexts_from and str(args.contexts_from),
                                        "rows": rows}, indent=1))  # fmt: skip
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
