"""How many of a run's steps the device drafter stages on the device, on CPU (issue 15).

The device drafter's steps launch before the last step's tokens reach the host; a step it
cannot stage (a cut chain, a sequence near the context's end, a waiting prompt) is staged from
the host and waits. Which steps those are is decided by the scheduler and the engine, not by
the GPU, so the share can be counted on CPU: the verify buffers run uncaptured and the
kernels' PyTorch twins stand in, as in tests/engine/test_device_drafts.py. Greedy prompt
lookup over held-out code, ``batch`` prompts at a time; also prints tokens an engine step and
how many outputs are plain decoding's (all of them: greedy speculation is lossless in float32).

    python benchmarks/device_chain_share.py [--k 8,16] [--batch-sizes 1,8] [--num-prompts 16]
        [--datastore DATASET_DIR] [--queue]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from spec_real_bench import (  # noqa: E402
    add_prompt_args,
    add_queue_arg,
    completion_prompts,
    reset_pass,
    timed_run,
)

from parallm import LLM, SamplingParams  # noqa: E402
from parallm.bundled import BUNDLED_MODEL_DIR  # noqa: E402
from parallm.engine.verify_graph import drafter_shapes  # noqa: E402


def device_llm(model: str, k: int, max_batch: int, max_model_len: int,
               datastore: str | None = None) -> LLM:  # fmt: skip
    """A CPU engine in the device drafter's mode: async scheduling, verify buffers for batches
    up to ``max_batch`` run uncaptured, prompt lookup (n 1-5, the default ring, ``datastore``
    after it) on the device drafter's path."""
    spec = {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 1,
            "prompt_lookup_max": 5}  # fmt: skip
    if datastore:
        spec["prompt_lookup_datastore"] = datastore
    llm = LLM(model, device="cpu", dtype="float32", async_scheduling=True,
              speculative_config=spec, max_num_seqs=max_batch,
              max_model_len=max_model_len)  # fmt: skip
    engine = llm.engine
    sizes = [s for s in (1, 2, 4, 8, 16, 32) if s <= max_batch] or [1]
    shapes = drafter_shapes(engine.drafter, sizes, engine.config.max_num_batched_tokens)
    engine.runner.capture_verify_graphs(shapes, engine.max_model_len, capture=False)
    if not engine.enable_device_drafting():
        raise SystemExit(f"k = {k}: no verify shape holds full chains at these batch sizes")
    return llm


def measure(llm: LLM, prompts: list[list[int]], params: SamplingParams, batch: int,
            plain: list[list[int]], queue: bool = False) -> dict:  # fmt: skip
    engine = llm.engine
    reset_pass(llm)  # each run drafts from its own requests only, not an earlier run's outputs
    steps, overlapped = engine.num_steps, engine.num_overlapped_steps
    outputs, seconds = timed_run(llm, prompts, params, batch, queue)
    steps, overlapped = engine.num_steps - steps, engine.num_overlapped_steps - overlapped
    tokens = sum(map(len, outputs))
    identical = sum(out == want for out, want in zip(outputs, plain, strict=True))
    return {"batch": batch, "steps": steps, "overlapped_share": overlapped / steps,
            "tokens_per_engine_step": tokens / steps, "identical": identical,
            "outputs": len(outputs), "seconds": seconds}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    ap.add_argument("--model", default=str(BUNDLED_MODEL_DIR), help="the target's folder")
    ap.add_argument("--k", type=ints, default=[8, 16], help="drafts a step")
    ap.add_argument("--batch-sizes", type=ints, default=[1, 8], help="prompts run at a time")
    ap.add_argument("--num-prompts", type=int, default=16, help="held-out prompts")
    ap.add_argument("--seed", type=int, default=0, help="which held-out files")
    ap.add_argument("--datastore", default=None,
                    help="a dataset folder `parallm train` prepared with the model's tokenizer, "
                         "drafted from after the ring (prompt_lookup_datastore)")  # fmt: skip
    add_prompt_args(ap, corpus="stdlib", val_fraction=0.02)
    add_queue_arg(ap)
    return ap


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    plain_llm = LLM(args.model, device="cpu", dtype="float32", max_model_len=args.max_model_len)
    prompts = completion_prompts(args.corpus, args.val_fraction, plain_llm.get_tokenizer(),
                                 args.num_prompts, args.prompt_len, args.seed)  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    plain = timed_run(plain_llm, prompts, params, max(args.batch_sizes))[0]
    rows = []
    for k in args.k:
        llm = device_llm(args.model, k, max(args.batch_sizes), args.max_model_len, args.datastore)
        for batch in args.batch_sizes:
            row = {
                "k": k,
                "queue": args.queue,
                **measure(llm, prompts, params, batch, plain, args.queue),
            }
            print(f"k {k:>2} batch {batch:>2}: {row['steps']} steps, "
                  f"{row['overlapped_share']:.0%} staged on the device, "
                  f"{row['tokens_per_engine_step']:.2f} tokens an engine step, "
                  f"{row['identical']}/{row['outputs']} outputs plain decoding's")  # fmt: skip
            rows.append(row)
    return rows


if __name__ == "__main__":
    main()
