"""Where a decode step's time goes: graph replay time, host profile, and a per-kernel table.

The kernel table comes from ``torch.profiler`` over eager decode steps (graph replays hide their
kernels from the profiler); it groups kernels by name and reports count and device time per step,
which is the profile that decides what to fuse.

python benchmarks/profile_decode.py --config benchmarks/configs/llama-3.2-1b.json [--fused-kernels]
    [--quantization fp8|int8] [--kv-cache-dtype fp8] [--timeline --batch N
    [--speculative-config '{"method": "ngram", "num_speculative_tokens": 8}']]
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import json
import pstats
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from parallm import LLM, SamplingParams
from parallm.bench.common import cuda_ms_per_call


def _make_llm(args: argparse.Namespace, eager: bool) -> LLM:
    return LLM(
        args.config,
        load_format="dummy",
        # 4096, or less for a model whose positions stop short of it (the 150M code model's 1024)
        max_model_len=min(
            4096, json.loads(Path(args.config).read_text()).get("max_position_embeddings", 4096)
        ),
        max_num_seqs=max(8, args.batch),
        gpu_memory_utilization=0.4,
        enforce_eager=eager,
        fused_kernels=args.fused_kernels,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
        speculative_config=args.speculative_config,
    )


def _prompts(args: argparse.Namespace, token: int) -> list[dict]:
    return [{"prompt_token_ids": [token + i] * 128} for i in range(args.batch)]


def graph_and_host(args: argparse.Namespace) -> None:
    llm = _make_llm(args, eager=False)
    params = SamplingParams(temperature=0, max_tokens=args.steps, ignore_eos=True)
    llm.generate(_prompts(args, 11), params, use_tqdm=False)
    graphs = llm.engine.runner.graphs
    size = graphs.padded_size(args.batch)
    ms = cuda_ms_per_call(functools.partial(graphs.replay, size), 100)
    graphs.forget_inputs()  # the replays moved the inputs on: the next step copies them
    print(f"graph replay alone (batch {args.batch}): {ms:.3f} ms")
    t = time.perf_counter()
    llm.generate(_prompts(args, 12), params, use_tqdm=False)
    print(f"generate: {(time.perf_counter() - t) / args.steps * 1e3:.3f} ms per step (unprofiled)")
    prof = cProfile.Profile()
    prof.enable()
    llm.generate(_prompts(args, 13), params, use_tqdm=False)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)
    del graphs
    llm.close()


def kernel_table(args: argparse.Namespace) -> None:
    llm = _make_llm(args, eager=True)
    steps = 20
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    llm.generate(_prompts(args, 21), params, use_tqdm=False)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate(_prompts(args, 22), params, use_tqdm=False)
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            entry = totals[evt.name[:60]]
            entry[0] += 1
            entry[1] += evt.device_time_total
    # Per decode step; the one prefill step is a small share of 20 steps and is included.
    rows = sorted(totals.items(), key=lambda kv: -kv[1][1])
    count = sum(c for c, _ in totals.values()) / steps
    busy = sum(t for _, t in totals.values()) / steps / 1e3
    print(f"\neager batch {args.batch}: {count:.0f} kernels/step, {busy:.3f} ms device busy/step")
    print(f"{'kernel':<62}{'per step':>9}{'ms/step':>9}{'share':>7}")
    for name, (c, t) in rows[:28]:
        ms = t / steps / 1e3
        print(f"{name:<62}{c / steps:>9.1f}{ms:>9.4f}{ms / busy:>7.1%}")


def timeline(args: argparse.Namespace) -> None:
    """GPU idle time inside the engine's own decode loop (CUDA graphs, async scheduling).

    Every kernel and copy the profiler saw, in start order: the union of their intervals is the
    busy time; the rest of the span is time the GPU waited for the host. The largest gaps are
    printed with the work on either side.
    """
    llm = _make_llm(args, eager=False)
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    llm.generate(_prompts(args, 31), params, use_tqdm=False)
    engine = llm.engine
    for i, prompt in enumerate(_prompts(args, 32)):
        engine.add_request(f"timeline-{i}", prompt["prompt_token_ids"], params)
    for _ in range(3):  # the prefill and the first decode steps stay out of the profile
        engine.step()
    torch.cuda.synchronize()
    first = engine.num_steps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        while engine.has_unfinished_requests():
            engine.step()
    steps = engine.num_steps - first
    spans = sorted(
        (e.time_range.start, e.time_range.end, e.name[:40])
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start
    )
    busy, gaps, end = 0.0, [], spans[0][0]
    prev_name = ""
    for start, stop, name in spans:
        if start > end:
            gaps.append((start - end, prev_name, name))
        busy += max(0.0, stop - max(start, end))
        if stop > end:
            end, prev_name = stop, name
    span = end - spans[0][0]
    idle = sum(g[0] for g in gaps)
    label = "decode" if args.speculative_config is None else "verify"
    print(f"\ntimeline, batch {args.batch}, {steps} {label} steps: {len(spans)} GPU ops over {span / 1e3:.2f} ms, "
          f"busy {busy / 1e3:.2f} ms ({busy / span:.1%}), idle {idle / 1e3:.2f} ms "
          f"in {len(gaps)} gaps")  # fmt: skip
    print(f"per step: {span / steps / 1e3:.3f} ms, busy {busy / steps / 1e3:.3f} ms, "
          f"idle {idle / steps / 1e3:.3f} ms in {len(gaps) / steps:.0f} gaps")  # fmt: skip
    for gap, before, after in sorted(gaps, reverse=True)[:12]:
        print(f"  {gap:8.1f} us idle between {before!r} and {after!r}")
    _print_per_step(spans, gaps, steps)


def _print_per_step(spans: list[tuple], gaps: list[tuple], steps: int) -> None:
    """Time per step by op name (overlapping PDL kernels counted in full) and idle time by the
    pair of ops around it: which boundaries and copies cost the most."""
    by_name: dict[str, list[float]] = {}
    for start, stop, name in spans:
        by_name.setdefault(name, []).append(stop - start)
    print(f"\n{'op':<42}{'per step':>9}{'us/step':>9}{'us each':>9}")
    for name, durs in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:16]:
        print(
            f"{name:<42}{len(durs) / steps:>9.1f}{sum(durs) / steps:>9.1f}{sum(durs) / len(durs):>9.2f}"
        )
    by_pair: dict[tuple[str, str], list[float]] = {}
    for gap, before, after in gaps:
        by_pair.setdefault((before[:20], after[:20]), []).append(gap)
    print(f"\n{'idle between':<44}{'per step':>9}{'us/step':>9}")
    for (before, after), g in sorted(by_pair.items(), key=lambda kv: -sum(kv[1]))[:12]:
        print(f"{before:<20} -> {after:<20}{len(g) / steps:>9.1f}{sum(g) / steps:>9.1f}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True, help="model config.json (dummy weights)")
    ap.add_argument("--steps", type=int, default=200, help="decode steps to time")
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    ap.add_argument(
        "--fused-kernels",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Triton fused ops (default: the engine's, on for CUDA)",
    )
    ap.add_argument("--quantization", choices=["fp8", "int8"], default=None,
                    help="quantize the weights at load (default: none)")  # fmt: skip
    ap.add_argument("--kv-cache-dtype", default="auto", help="KV cache dtype (default: auto)")
    ap.add_argument("--timeline", action="store_true", help="only the GPU idle-time timeline")
    ap.add_argument("--speculative-config", type=json.loads, default=None,
                    help="JSON speculative config for --timeline (its steps are then verify "
                         "steps; the prompts repeat one token, so ngram always drafts; "
                         "default: plain decoding)")  # fmt: skip
    return ap


def main() -> None:
    args = build_parser().parse_args()
    if args.speculative_config is not None and not args.timeline:
        raise SystemExit("--speculative-config: only with --timeline")
    if args.timeline:
        timeline(args)
        return
    graph_and_host(args)
    kernel_table(args)


if __name__ == "__main__":
    main()
