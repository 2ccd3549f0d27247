"""Where a batch-1 request's time goes: its prefill against its decode steps.

At batch 1 every request pays its prefill once, whatever the decoding: a fixed cost that a
speculative run's speedup is diluted by. This times requests one at a time on dummy weights:
``max_tokens=1`` (prefill and one step) per prompt, each printed so that a stall (a kernel
compiled mid-run) shows, then whole requests, and a ``torch.profiler`` table of a few prefills
(host time by op, device time by kernel):

    python benchmarks/request_profile.py --config benchmarks/configs/code-model-150m.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parallm import LLM, SamplingParams  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def request_ms(llm: LLM, prompt: list[int], max_tokens: int) -> float:
    """Wall milliseconds of one request run alone, its prompt computed afresh."""
    llm.reset_prefix_cache()
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    sync()
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    sync()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    ap.add_argument("--config", required=True, help="model config.json (dummy weights)")
    ap.add_argument("--prompt-len", type=int, default=512, help="longest prompt; lengths vary")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens of a whole request")
    ap.add_argument("--num-prompts", type=int, default=24, help="prompts timed per measurement")
    ap.add_argument("--speculative-config", type=json.loads, default=None,
                    help="JSON speculative_config; unset: plain decoding")  # fmt: skip
    ap.add_argument("--rows", type=int, default=12, help="rows of each profile table printed")
    ap.add_argument("--tables", default="", help="folder to write the whole tables to")
    args = ap.parse_args()
    llm = LLM(args.config, load_format="dummy", max_model_len=args.prompt_len + args.max_tokens + 16,
              gpu_memory_utilization=0.3, speculative_config=args.speculative_config)  # fmt: skip
    rng = random.Random(0)
    vocab = llm.engine.model_config.vocab_size
    lengths = [
        args.prompt_len - rng.randrange(0, args.prompt_len // 4) for _ in range(args.num_prompts)
    ]
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in lengths]
    request_ms(llm, prompts[0], 4)  # the first request's one-off costs
    first = [request_ms(llm, p, 1) for p in prompts]
    print("prefill + 1 step, ms per request in order:", " ".join(f"{ms:.1f}" for ms in first))
    again = [request_ms(llm, p, 1) for p in prompts]
    print("the same prompts again:                   ", " ".join(f"{ms:.1f}" for ms in again))
    whole = [request_ms(llm, p, args.max_tokens) for p in prompts]
    prefill, total = statistics.median(again), statistics.median(whole)
    print(f"median: prefill + 1 step {prefill:.2f} ms; {args.max_tokens} tokens {total:.2f} ms; "
          f"decode {(total - prefill) / (args.max_tokens - 1) * 1e3:.0f} us/token; prefill share "
          f"{prefill / total:.0%}")  # fmt: skip
    for label, max_tokens in (("prefill", 1), ("request", args.max_tokens)):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for p in prompts[:3]:
                request_ms(llm, p, max_tokens)
        table = prof.key_averages()
        if args.tables:
            Path(args.tables, f"{label}.txt").write_text(
                table.table(sort_by="self_cpu_time_total", row_limit=60, max_name_column_width=80)
            )
        for sort in ("self_cpu_time_total", "self_device_time_total"):
            print(f"{label} ({max_tokens} tokens), 3 requests, top {args.rows} by {sort}:")
            print(f"{'op':<56}{'self cpu ms':>12}{'device ms':>11}{'calls':>7}")
            for event in sorted(table, key=lambda e: getattr(e, sort), reverse=True)[: args.rows]:
                print(f"{event.key[:55]:<56}{event.self_cpu_time_total / 1e3:12.2f}"
                      f"{event.self_device_time_total / 1e3:11.2f}{event.count:7d}")  # fmt: skip


if __name__ == "__main__":
    main()
