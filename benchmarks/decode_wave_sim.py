"""How much the start order of decode attention's programs can matter, on CPU: a list schedule
of one decode launch's programs over a GPU's program slots, batch order against longest first.

Each of a batch's rows gives one program a KV head (no context splits: past about four
programs an SM the decode kernel has none), whose work is its row's context in key tiles of
128 plus one for its fixed cost. Programs start in the order given, each on the first slot to
come free; the launch ends when the last one does. Contexts as ``decode_order_bench.py`` draws
them from the Azure conversation trace. The model leaves out that programs running alone at
the end of a launch get more memory bandwidth each, so it bounds the effect from above;
``decode_order_bench.py`` measures it on the GPU.

    python benchmarks/decode_wave_sim.py [--trace CSV] [--batches 54,97,128] [--slots 132,264,528]
"""

from __future__ import annotations

import argparse
import heapq
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trace_contexts import TRACE, draw_contexts, trace_requests  # noqa: E402

KEY_TILE = 128


def makespan(work: list[float], slots: int) -> float:
    """When the last of ``work``'s programs ends, each started in order on the first free slot."""
    free = [0.0] * slots
    for w in work:
        heapq.heappush(free, heapq.heappop(free) + w)
    return max(free)


def programs(contexts: list[int], kv_heads: int) -> list[float]:
    """The launch's programs in batch order: KV heads fastest, as the kernel's grid runs."""
    return [c / KEY_TILE + 1.0 for c in contexts for _ in range(kv_heads)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--trace", type=Path, default=TRACE, help="Azure LLM inference trace CSV")
    p.add_argument("--batches", default="54,97,128", help="decode batch sizes, comma-separated")
    p.add_argument("--slots", default="132,264,528",
                   help="programs the GPU runs at once (SMs x programs an SM), comma-separated")  # fmt: skip
    p.add_argument("--kv-heads", type=int, default=8, help="KV heads (Llama-3.1-8B: 8)")
    p.add_argument("--draws", type=int, default=300, help="batches drawn a case")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prompts, outputs = trace_requests(args.trace)
    rng = np.random.default_rng(args.seed)
    print("| batch | slots | batch order / longest first | longest first / bound |")
    print("|---:|---:|---:|---:|")
    for batch in (int(b) for b in args.batches.split(",")):
        for slots in (int(s) for s in args.slots.split(",")):
            ratios, tight = [], []
            for _ in range(args.draws):
                work = programs(draw_contexts(prompts, outputs, batch, rng), args.kv_heads)
                ordered = makespan(sorted(work, reverse=True), slots)
                ratios.append(makespan(work, slots) / ordered)
                tight.append(ordered / max(max(work), sum(work) / slots))
            print(f"| {batch} | {slots} | {statistics.mean(ratios):.3f} | "
                  f"{statistics.mean(tight):.3f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
