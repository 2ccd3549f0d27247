"""Decode attention with its rows started in batch order against longest first, on the
contexts of a serving load (needs a CUDA GPU).

Past about four programs an SM the decode kernel has no context splits and its programs run in
waves; a serving batch's contexts run from tens of tokens to thousands, so a long row whose
programs start in the last wave runs on alone (``parallm/kernels/paged_decode.py``). For each
batch size this draws ``--draws`` batches of contexts from the Azure conversation trace (a
request's prompt, capped at 3,500 tokens, plus a uniform share of its output: a request part
way through its decode), in the trace's order, and times one layer's decode attention three
ways on the same data, each replayed from a CUDA graph: rows in batch order, longest first
(what the decode graphs stage) and shortest first (the worst order). A batch of one shared
context (the draws' mean) is the control: there the order cannot matter. Every ordered output
must equal the unordered one bit for bit.

    python benchmarks/decode_order_bench.py [--trace CSV] [--batches 32,64,97,128,256]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention_bench import DTYPES, MODELS, bench, make_cache  # noqa: E402
from trace_contexts import TRACE, draw_contexts, trace_requests  # noqa: E402

from parallm.kernels.paged_decode import longest_first, paged_decode_attention  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--trace", type=Path, default=TRACE,
                   help="Azure LLM inference trace CSV (ContextTokens, GeneratedTokens); "
                   "carried to the GPU machine as .peers/data")  # fmt: skip
    p.add_argument("--batches", default="32,64,97,128,256",
                   help="decode batch sizes, comma-separated")  # fmt: skip
    p.add_argument("--draws", type=int, default=5, help="batches of contexts drawn a size")
    p.add_argument("--model", choices=sorted(MODELS), default="llama-3.1-8b",
                   help="attention heads (query heads, KV heads, head dim) of this model")  # fmt: skip
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError:
        p.error(f"--batches: expected positive integers separated by commas, got {args.batches!r}")
    if not args.batches or min(args.batches) < 1:
        p.error(f"--batches: expected positive integers separated by commas, got {args.batches}")
    if args.draws < 1:
        p.error(f"--draws: expected at least 1, got {args.draws}")
    return args


def time_orders(contexts: list[int], heads: tuple[int, int, int], dtype: torch.dtype) -> dict:
    """Microseconds of one decode attention call per row order, checked bit for bit."""
    q, k_cache, v_cache, tables, _, seq_lens = make_cache([(1, c) for c in contexts], heads, dtype)
    args = (q, k_cache, v_cache, tables, seq_lens, heads[2] ** -0.5, max(contexts))
    longest = longest_first(contexts)
    orders = {"batch": None, "longest first": longest, "shortest first": longest[::-1].copy()}
    want = paged_decode_attention(*args)
    us = {}
    for name, order in orders.items():
        row_order = None if order is None else torch.from_numpy(order).to(q.device)
        got = paged_decode_attention(*args, row_order=row_order)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        us[name] = 1e3 * bench(lambda ro=row_order: paged_decode_attention(*args, row_order=ro))
    return us


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.trace.is_file():  # here, not in parse_args: the plan's checks parse elsewhere
        raise SystemExit(f"--trace {args.trace}: no such file (carry .peers/data: "
                         "benchmarks/peers/README.md)")  # fmt: skip
    heads, dtype = MODELS[args.model], DTYPES[args.dtype]
    prompts, outputs = trace_requests(args.trace)
    rng = np.random.default_rng(args.seed)
    print(f"{torch.cuda.get_device_name()}, {args.model} heads {heads}, {args.dtype}; "
          f"µs a layer, median of {args.draws} draws")  # fmt: skip
    print("| batch | contexts mean / max | batch order | longest first | shortest first | "
          "batch / longest | one shared context: batch / longest |")  # fmt: skip
    print("|---:|---|---:|---:|---:|---:|---:|")
    rows = []
    for batch in args.batches:
        draws = [draw_contexts(prompts, outputs, batch, rng) for _ in range(args.draws)]
        timed = [time_orders(c, heads, dtype) for c in draws]
        median = {k: statistics.median(t[k] for t in timed) for k in timed[0]}
        mean = int(statistics.mean(c for d in draws for c in d))
        control = time_orders([mean] * batch, heads, dtype)
        row = {"batch": batch, "mean_context": mean,
               "max_context": int(statistics.median(max(d) for d in draws)), "us": median,
               "control_us": control}  # fmt: skip
        rows.append(row)
        print(f"| {batch} | {mean} / {row['max_context']} | {median['batch']:.1f} | "
              f"{median['longest first']:.1f} | {median['shortest first']:.1f} | "
              f"{median['batch'] / median['longest first']:.3f} | "
              f"{control['batch'] / control['longest first']:.3f} |")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "dtype": args.dtype,
                                        "rows": rows}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
