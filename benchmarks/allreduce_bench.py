"""Decode-sized all-reduces: NCCL against torch symmetric memory's one-shot all-reduce.

Tensor-parallel decode runs two all-reduces per layer on ``[batch, hidden]`` activations
(after attention's o_proj and the MLP's down_proj), small enough that launch and
synchronisation cost more than bandwidth. This times, per (hidden, batch) in bfloat16:

- ``nccl``: ``torch.distributed.all_reduce`` on the NCCL default group (the engine's today);
- ``symm``: ``torch.ops.symm_mem.one_shot_all_reduce_out`` (each rank reads every peer's
  buffer over NVLink and sums; the input is copied into a rendezvoused symmetric buffer
  first, as an engine would have to), multicast off;

each eagerly (a loop of launches, as tensor-parallel decode runs now) and replayed from a
CUDA graph of ``--graph-ops`` all-reduces (as a decode graph would run them). Both results are
checked against each other before timing. Times are medians over ``--repeats`` rounds of
``--iters`` all-reduces, in microseconds per all-reduce, rank 0's view.

    torchrun --standalone --nproc-per-node 2 benchmarks/allreduce_bench.py --out ar.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import traceback
from collections.abc import Callable
from pathlib import Path

# NVLink multicast stays off on the lent machines (set before torch initialises NCCL).
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from parallm.bench.common import cuda_ms_per_call  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--hidden", default="2048,4096", help="hidden sizes, comma-separated")
    p.add_argument("--batches", default="1,2,4,8,16,32,64,128", help="batch sizes (rows)")
    p.add_argument("--iters", type=int, default=200, help="all-reduces per timed round")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (the median is kept)")
    p.add_argument("--graph-ops", type=int, default=64, help="all-reduces captured per graph")
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    return p.parse_args(argv)


def _csv(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def time_us(fn: Callable[[], None], iters: int, repeats: int) -> float:
    """Median microseconds per call of ``fn`` over ``repeats`` rounds of ``iters`` calls."""
    for _ in range(3):  # warm-up
        fn()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(repeats):
        dist.barrier()
        rounds.append(cuda_ms_per_call(fn, iters) * 1e3)
    return statistics.median(rounds)


def time_graph_us(fn: Callable[[], None], ops: int, iters: int, repeats: int) -> float:
    """``fn`` captured ``ops`` times in one CUDA graph; microseconds per captured call."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # initialise outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(ops):
            fn()
    replays = max(1, iters // ops)
    return time_us(graph.replay, replays, repeats) / ops


class SymmAllReduce:
    """One-shot all-reduce out of a symmetric buffer big enough for the largest case."""

    def __init__(self, numel: int, device: torch.device) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = dist.group.WORLD.group_name
        self.buffer = symm_mem.empty(numel, dtype=torch.bfloat16, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> None:
        staged = self.buffer[: x.numel()]
        staged.copy_(x.view(-1))
        torch.ops.symm_mem.one_shot_all_reduce_out(staged, "sum", self.group_name, out.view(-1))


def bench_case(hidden: int, batch: int, symm: SymmAllReduce | None, args) -> dict:
    device = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(device=device).manual_seed(dist.get_rank())
    x = torch.randn(batch, hidden, dtype=torch.bfloat16, device=device, generator=gen)
    row: dict = {"hidden": hidden, "batch": batch, "bytes": x.numel() * x.element_size()}
    nccl_buf = x.clone()

    def nccl() -> None:
        dist.all_reduce(nccl_buf)

    row["nccl_us"] = time_us(nccl, args.iters, args.repeats)
    row["nccl_graph_us"] = _guarded(row, "nccl_graph", lambda: time_graph_us(
        nccl, args.graph_ops, args.iters, args.repeats))  # fmt: skip
    if symm is not None:
        out = torch.empty_like(x)
        want = x.clone()
        dist.all_reduce(want)
        symm(x, out)
        torch.cuda.synchronize()
        # bf16 sums of 2..8 terms in another order: a few ulps apart at most.
        row["symm_matches_nccl"] = bool(torch.allclose(out, want, rtol=2e-2, atol=2e-2))
        row["symm_us"] = _guarded(row, "symm", lambda: time_us(
            lambda: symm(x, out), args.iters, args.repeats))  # fmt: skip
        row["symm_graph_us"] = _guarded(row, "symm_graph", lambda: time_graph_us(
            lambda: symm(x, out), args.graph_ops, args.iters, args.repeats))  # fmt: skip
    return row


def _guarded(row: dict, name: str, measure: Callable[[], float]) -> float | None:
    """A mode that fails (an unsupported op, a capture error) records its error, not a time."""
    try:
        return measure()
    except Exception as e:  # noqa: BLE001 - reported in the row
        row[f"{name}_error"] = f"{type(e).__name__}: {e}"
        if dist.get_rank() == 0:
            traceback.print_exc()
        return None


def main() -> int:
    args = parse_args()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl")
    hiddens, batches = _csv(args.hidden), _csv(args.batches)
    device = torch.device("cuda", local_rank)
    symm, symm_error = None, None
    try:
        symm = SymmAllReduce(max(hiddens) * max(batches), device)
    except Exception as e:  # noqa: BLE001 - torch without symmetric memory: NCCL alone
        symm_error = f"{type(e).__name__}: {e}"
    rows = [bench_case(h, b, symm, args) for h in hiddens for b in batches]
    for row in rows:
        pairs = [(row.get(f"{k}_us"), k) for k in ("nccl", "symm", "nccl_graph", "symm_graph")]
        eager = [p for p in pairs[:2] if p[0] is not None]
        row["faster_eager"] = min(eager)[1] if eager else None
        graphed = [p for p in pairs[2:] if p[0] is not None]
        row["faster_graph"] = min(graphed)[1] if graphed else None
    if dist.get_rank() == 0:
        _report(rows, args, symm_error)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _report(rows: list[dict], args: argparse.Namespace, symm_error: str | None) -> None:
    world = dist.get_world_size()
    print(f"all-reduce, bf16, {world} GPUs ({torch.cuda.get_device_name()}), "
          f"torch {torch.__version__}; us per all-reduce (median)")  # fmt: skip
    if symm_error:
        print(f"symmetric memory unavailable: {symm_error}")
    header = (
        f"{'hidden':>6} {'batch':>5} {'nccl':>8} {'symm':>8} {'nccl graph':>10} {'symm graph':>10}"
    )
    print(header)

    def fmt(v: float | None, width: int) -> str:
        return f"{v:>{width}.2f}" if v is not None else f"{'-':>{width}}"

    for r in rows:
        print(f"{r['hidden']:>6} {r['batch']:>5} {fmt(r.get('nccl_us'), 8)} "
              f"{fmt(r.get('symm_us'), 8)} {fmt(r.get('nccl_graph_us'), 10)} "
              f"{fmt(r.get('symm_graph_us'), 10)}")  # fmt: skip
    if args.out is not None:
        payload = {"benchmark": "allreduce", "world_size": world, "torch": torch.__version__,
                   "device": torch.cuda.get_device_name(), "symm_error": symm_error,
                   "commit": os.environ.get("PARALLM_COMMIT"), "args": vars(args) | {"out": str(args.out)},
                   "results": rows}  # fmt: skip
        args.out.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
