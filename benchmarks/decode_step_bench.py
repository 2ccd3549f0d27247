"""Where a graph-replayed decode step's device time goes, without the engine's host work.

Four loops per batch size, timed with CUDA events and no host sync inside:
  graph     the captured graph alone (forward, logits, greedy argmax; the graph advances its
            own inputs, so the context grows by one token a replay);
  staged    + the per-step input staging (pinned copies) of ``DecodeGraphs.run``;
  launched  + the token copy back (none when the graph writes them to pinned memory itself)
            and the step's event, as ``ModelRunner.launch`` does each step;
  carried   a greedy continuation through ``DecodeGraphs.run``: ids from the previous replay,
            context growing, tables growing a block at a time; steps whose inputs the
            previous replay already advanced copy nothing.
``parallm bench latency`` minus ``launched`` is the host time the GPU waited for.

python benchmarks/decode_step_bench.py --config benchmarks/configs/llama-3.2-1b.json
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json

import numpy as np
import torch

from parallm import LLM
from parallm.bench.common import cuda_ms_per_call
from parallm.engine import one_row_step
from parallm.kernels import pdl


def _events_ms(fn, iters: int) -> float:
    fn()
    return cuda_ms_per_call(fn, iters)


def _decode_inputs(batch: int, context: int, block_size: int) -> tuple[np.ndarray, ...]:
    blocks = -(-(context + 1) // block_size)
    tables = np.arange(batch * blocks, dtype=np.int32).reshape(batch, blocks)
    positions = np.full(batch, context, dtype=np.int64)
    slots = tables[:, context // block_size].astype(np.int64) * block_size + context % block_size
    ids = np.arange(batch, dtype=np.int64) + 7
    return ids, positions, slots, (positions + 1).astype(np.int32), tables


def time_step(llm: LLM, batch: int, context: int, iters: int) -> dict[str, float]:
    runner = llm.engine.runner
    graphs = runner.graphs
    inputs = _decode_inputs(batch, context, runner.block_size)
    size = graphs.padded_size(batch)
    graphs.run(*inputs)  # a replay alone reuses the staged inputs: stage this context first
    # Each replay moves its inputs on by one token (as decoding does): over the loop the
    # context grows from `context` to `context + iters`.
    out = {"graph_ms": _events_ms(lambda: graphs.replay(size), iters)}
    graphs.forget_inputs()
    out["staged_ms"] = _events_ms(lambda: graphs.run(*inputs), iters)

    def launched() -> None:
        _, ids, host = graphs.run(*inputs)
        if host is None:  # else the graph's argmax wrote them to pinned memory itself
            host = torch.empty(ids.shape, dtype=torch.long, pin_memory=True)
            host.copy_(ids, non_blocking=True)
        torch.cuda.Event().record()

    out["launched_ms"] = _events_ms(launched, iters)
    out.update(time_carried(llm, batch, context, iters))
    return out


def time_carried(llm: LLM, batch: int, context: int, iters: int) -> dict[str, float]:
    """A greedy continuation: each step's ids are the previous replay's, its context one token
    longer and its tables growing a block every ``block_size`` steps, as in the engine. Steps
    whose inputs the previous replay already advanced skip the input copy."""
    runner = llm.engine.runner
    graphs, bs = runner.graphs, runner.block_size
    tables = _decode_inputs(batch, context + iters + 1, bs)[4]
    steps = []
    for i in range(iters + 1):
        pos = context + i
        positions = np.full(batch, pos, dtype=np.int64)
        rows = tables[:, : pos // bs + 1]
        slots = rows[:, -1].astype(np.int64) * bs + pos % bs
        steps.append((positions + 7, positions, slots, (positions + 1).astype(np.int32), rows))
    graphs.forget_inputs()
    skipped = graphs.num_skipped_copies
    _, ids, _ = graphs.run(*steps[0])
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for step in steps[1:]:
        _, ids, _ = graphs.run(*step, device_ids=ids)
    end.record()
    end.synchronize()
    graphs.forget_inputs()  # the next timing stages a fixed context again
    return {"carried_ms": start.elapsed_time(end) / iters,
            "skipped_copies": (graphs.num_skipped_copies - skipped) / iters}  # fmt: skip


def _set(module: object, **values: object) -> None:
    for name, value in values.items():
        setattr(module, name, value)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True, help="model config.json (dummy weights)")
    ap.add_argument("--batch-sizes", default="1,8,32", help="comma-separated decode batch sizes")
    ap.add_argument("--context", type=int, default=192, help="tokens already in each sequence")
    ap.add_argument("--iters", type=int, default=200, help="replays per timing")
    ap.add_argument("--blas", choices=["default", "cublas", "cublaslt"], default="default",
                    help="torch.backends.cuda.preferred_blas_library for the GEMMs")  # fmt: skip
    ap.add_argument("--compare-pdl", action="store_true",
                    help="also time the one-row chain without PDL (recaptures)")  # fmt: skip
    ap.add_argument("--compare-const", default=None, metavar="MODULE.NAME=V1,V2",
                    help="time each value of a module constant: integers separated by commas, "
                         "e.g. parallm.kernels.paged_decode._DECODE_MIN_KEYS_PER_SPLIT=128,512, "
                         "or tuples separated by semicolons, e.g. "
                         "'parallm.kernels.gemv.O_TILE=(8,1024,4);(4,2048,4)' (recaptures)")  # fmt: skip
    ap.add_argument("--repeat", type=int, default=1, help="time the list of variants this often")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    return ap


def main() -> None:
    args = build_parser().parse_args()
    if args.blas != "default":
        torch.backends.cuda.preferred_blas_library(args.blas)
    llm = LLM(args.config, load_format="dummy", max_model_len=4096, gpu_memory_utilization=0.5)
    rows = []
    runner = llm.engine.runner
    print(f"PDL supported by this triton: {pdl._SUPPORTED}")
    supported = one_row_step.pdl_supported
    variants = [("default", lambda: _set(one_row_step, pdl_supported=supported))]
    if args.compare_pdl:  # the one-row chain without PDL, by patching its support check
        variants.append(("pdl off", lambda: _set(one_row_step, pdl_supported=lambda t: False)))
    if args.compare_const:
        target, values = args.compare_const.split("=")
        module = importlib.import_module(target.rsplit(".", 1)[0])
        name = target.rsplit(".", 1)[1]
        # Integers separated by commas, or Python literals (tuples) separated by semicolons.
        sep = ";" if ";" in values or "(" in values else ","
        original = getattr(module, name)
        variants[0] = ("default", lambda: setattr(module, name, original))
        for v in (ast.literal_eval(x.strip()) for x in values.split(sep)):
            variants.append((f"{name}={v}", lambda v=v: setattr(module, name, v)))
    # Variants are timed in rounds (--repeat) so that drift shows. With PDL off, batch 8 (which
    # never uses PDL) timed 54 us slower in every round on the H100, unexplained: compare
    # triggers with each other, not with off (benchmarks/RESULTS.md).
    for i, (label, setup) in enumerate(variants * args.repeat):
        if i:  # settings are read at every Triton launch: recapture to apply them
            setup()
            runner.capture_cuda_graphs(runner.graphs.sizes, 4096)
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            row = {
                "variant": label,
                "batch": batch,
                **time_step(llm, batch, args.context, args.iters),
            }
            rows.append(row)
            print(f"{label:>12} batch {batch:>3}: graph {row['graph_ms']:.4f} ms, staged "
                  f"{row['staged_ms']:.4f}, launched {row['launched_ms']:.4f}, carried "
                  f"{row['carried_ms']:.4f} ({row['skipped_copies']:.0%} without a copy)",
                  flush=True)  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
