"""Where a batch-1 decode step's time goes: host profile of the step loop plus graph replay time.

python benchmarks/profile_decode.py --config benchmarks/configs/llama-3.2-1b.json
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from parallm import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True, help="model config.json (dummy weights)")
    ap.add_argument("--steps", type=int, default=200, help="decode steps to profile")
    args = ap.parse_args()
    llm = LLM(args.config, load_format="dummy", max_model_len=4096, max_num_seqs=8)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=args.steps, ignore_eos=True)
    llm.generate([[11] * 128], params, use_tqdm=False)
    graphs = engine.runner.graphs
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(100):
        graphs.graphs[1].replay()
    end.record()
    end.synchronize()
    print(f"graph replay alone (batch 1): {start.elapsed_time(end) / 100:.3f} ms")
    t = time.perf_counter()
    llm.generate([[12] * 128], params, use_tqdm=False)
    print(f"generate: {(time.perf_counter() - t) / args.steps * 1e3:.3f} ms per step (unprofiled)")
    prof = cProfile.Profile()
    prof.enable()
    llm.generate([[13] * 128], params, use_tqdm=False)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
