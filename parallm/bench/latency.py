"""``parallm bench latency``: decode speed at fixed batch sizes against the bandwidth roofline."""

from __future__ import annotations

import argparse
import itertools
import time
from typing import Any

import torch

from parallm.bench import vllm_peer
from parallm.bench.common import (
    copy_bandwidth_gbps,
    cuda_ms_per_call,
    environment,
    print_table,
    random_prompts,
    weight_bytes_per_step,
    write_json,
)
from parallm.engine.runner import kv_bytes_per_block


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--batch-sizes",
        "--batch-size",
        type=batch_sizes,
        default="1,8,32,128",
        help="batch sizes to time: one, or several separated by commas",
    )
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=128, help="generated tokens per request")
    p.add_argument(
        "--iters",
        "--num-iters",
        type=int,
        default=3,
        help="timed repetitions after a warm-up run (the median is kept)",
    )
    # At these shapes (batches of at most 128 prompts of 128 tokens) parallm's limits change
    # only how a batch's prompts are chunked, not the decode steps timed: one vLLM run is enough.
    vllm_peer.add_args(p, default_configs="stock")


def batch_sizes(text: str) -> list[int]:
    """``"1,8,32"`` -> ``[1, 8, 32]``; each a positive integer."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"expected positive integers separated by commas, e.g. 1,8,32; got {text!r}"
        )
    return sizes


def _timed_run(llm: Any, prompts: list[list[int]], max_tokens: int) -> tuple[float, float]:
    """Seconds until every request has its first token (the prefill), and from then to the
    end (``max_tokens - 1`` decode steps), driving the engine directly. Requests do not
    stream, so per-step output building stays out of the timing as in ``generate``."""
    from parallm import SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    seqs = []
    for p in prompts:
        request_id = f"latency-{next(_request_ids)}"
        engine.add_request(request_id, p, params)
        seqs += engine.requests[request_id].seqs
    first = None
    while engine.has_unfinished_requests():
        engine.step()
        if first is None and all(s.num_output_tokens for s in seqs):
            first = time.perf_counter()
    return first - start, time.perf_counter() - first


_request_ids = itertools.count()


def graph_replay_ms(llm: Any, batch: int, iters: int = 50) -> float | None:
    """Device time of the captured decode graph alone, to split a step into GPU and host."""
    graphs = llm.engine.runner.graphs
    if llm.engine.tp_size > 1:  # rank 0's graph alone would wait in its collectives for ever
        return None
    size = graphs.padded_size(batch) if graphs is not None else None
    if size is None:
        return None
    graphs.replay(size)
    ms = cuda_ms_per_call(lambda: graphs.replay(size), iters)
    graphs.forget_inputs()  # the replays moved the inputs on: the next step copies them
    return ms


def run_prompts(batch: int, input_len: int, vocab: int, run: int) -> list[list[int]]:
    """The prompts of run ``run`` (0: the warm-up) at one batch size; --compare-vllm gives
    vLLM these same token ids."""
    return random_prompts(batch, [input_len] * batch, vocab, seed=run)


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def measure(llm: Any, batch: int, input_len: int, output_len: int, iters: int) -> dict[str, Any]:
    """Decode time per step: from the moment every request has its first token to the end,
    over ``output_len - 1`` steps, with the engine's host work and copies included (median of
    ``iters`` runs after a warm-up run). ``prefill_ms`` is the time to those first tokens.
    (Not a full run minus a prefill-only run: the first decode step overlaps the prefill's
    host work, so that difference is no step's time.)"""
    if output_len < 2:
        raise ValueError(f"--output-len must be at least 2 to time a decode step, got {output_len}")
    vocab = llm.engine.model_config.vocab_size
    decode, prefill = [], []
    for i in range(iters + 1):  # the first run warms up
        prompts = run_prompts(batch, input_len, vocab, i)
        llm.engine.kv.reset_prefix_cache()
        t_first, t_decode = _timed_run(llm, prompts, output_len)
        if i:
            prefill.append(t_first)
            decode.append(t_decode)
    step_s = max(_median(decode), 1e-9) / (output_len - 1)
    return {"batch_size": batch, "step_ms": step_s * 1e3, "prefill_ms": _median(prefill) * 1e3,
            "tokens_per_s": batch / step_s}  # fmt: skip


def run(args: argparse.Namespace, llm: Any) -> dict[str, Any]:
    engine = llm.engine
    weights = weight_bytes_per_step(engine.runner.model)
    # Per GPU: a tensor-parallel rank reads its shard of the weights and its heads' KV.
    kv_per_token = kv_bytes_per_block(
        engine.model_config, 1, engine.runner.kv_cache_dtype, engine.tp_size
    )
    # Only a GPU's copy rate is a roofline for decode; on a CPU the figure would be meaningless.
    copy_gbps = copy_bandwidth_gbps(engine.device)
    rows = []
    for batch in args.batch_sizes:
        before = engine.spec_stats.copy()
        measured = measure(llm, batch, args.input_len, args.output_len, args.iters)
        row = {"engine": "parallm", **measured}
        if engine.drafter is not None:
            row["tokens_per_drafted_step"] = engine.spec_stats.mean_since(before)
        _add_traffic(row, args, weights, kv_per_token, copy_gbps)
        row["ms_per_token"] = row["step_ms"]
        row["graph_ms"] = graph_replay_ms(llm, batch)
        rows.append(row)
    summary, device_type, drafter = engine.summary(), engine.device.type, engine.drafter
    if args.compare_vllm:
        peer = vllm_peer.peer_model(engine, args)
        vocab = engine.model_config.vocab_size
        runs = {b: [run_prompts(b, args.input_len, vocab, i) for i in range(args.iters + 1)]
                for b in args.batch_sizes}  # fmt: skip
        llm.close()  # vLLM gets the device memory
        for row in vllm_peer.latency_rows(peer, args.vllm_configs, runs, args.output_len):
            rows.append(_add_traffic(row, args, weights, kv_per_token, copy_gbps))
        vllm_peer.add_speedups(rows, "ms_per_token", higher_is_better=False, match="batch_size")
    print(summary)
    bandwidth = (f"{copy_gbps:.0f} GB/s" if copy_gbps
                 else f"not measured on {device_type} (no roofline columns)")  # fmt: skip
    print(f"copy bandwidth (read+write): {bandwidth}; weights read per step: "
          f"{weights / 1e9:.3f} GB; input {args.input_len}, output {args.output_len} tokens")  # fmt: skip
    columns = [("batch_size", "batch", "d"), ("ms_per_token", "ms/token", ".3f"),
               ("tokens_per_s", "tok/s", ".0f"), ("gb_per_step", "GB/step", ".4g")]  # fmt: skip
    if copy_gbps:
        columns += [("achieved_gbps", "GB/s", ".0f"), ("roofline_pct", "% copy bw", ".1f"),
                    ("graph_ms", "graph ms", ".3f")]  # fmt: skip
    if drafter is not None:
        columns.append(("tokens_per_drafted_step", "tok/drafted step", ".2f"))
    columns.append(("prefill_ms", "prefill ms", ".1f"))
    if args.compare_vllm:
        columns = [("engine", "engine", "s"), *columns, ("parallm_speedup", "parallm x", ".2f")]
    print_table(rows, columns)
    payload = {"benchmark": "latency", "env": environment(), "summary": summary,
               "copy_bandwidth_gbps": copy_gbps, "weight_bytes": weights, "args": vars(args) | {"func": None},
               "results": rows}  # fmt: skip
    if args.compare_vllm:
        payload["vllm"] = vllm_peer.describe(peer)
    write_json(args.out, payload)
    if args.plot is not None:
        title = (f"{vllm_peer.model_name(args)}: decode, input {args.input_len}, "
                 f"output {args.output_len} tokens")  # fmt: skip
        vllm_peer.plot_latency(rows, args.plot, title)
    return payload


def _add_traffic(row: dict[str, Any], args: argparse.Namespace, weights: int, kv_per_token: int,
                 copy_gbps: float | None) -> dict[str, Any]:  # fmt: skip
    """Bytes a decode step reads (all weights, and each sequence's KV at the mean context),
    and the rate that makes of the row's step time; the same model shape for every engine."""
    avg_context = args.input_len + args.output_len / 2
    row["bytes_per_step"] = weights + row["batch_size"] * avg_context * kv_per_token
    row["gb_per_step"] = row["bytes_per_step"] / 1e9
    row["achieved_gbps"] = row["bytes_per_step"] / (row["step_ms"] / 1e3) / 1e9
    if copy_gbps:
        row["roofline_pct"] = 100 * row["achieved_gbps"] / copy_gbps
    return row
