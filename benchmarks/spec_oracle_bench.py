"""Speculative decoding's system efficiency, independent of draft quality (issue 15, measure 1).

An oracle drafter (benchmark only) proposes the tokens the target will produce, each replaced
by a wrong token with probability ``--wrong``, at zero draft cost. For each batch size, draft
length k and wrong fraction it reports the mean tokens a drafted sequence emits per step and
the decode speedup against plain decoding (greedy, dummy weights, same prompts). A perfect
system would reach speedup = tokens per step; the ratio between them is the efficiency.

    python benchmarks/spec_oracle_bench.py --config benchmarks/configs/llama-3.1-8b.json \
        --batch-sizes 1,8,32 --k 2,4,8 --wrong 0,0.25 --out spec_oracle.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parallm import LLM, SamplingParams  # noqa: E402
from parallm.engine.spec import drafting  # noqa: E402


def _prompts(batch: int, input_len: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(input_len)] for _ in range(batch)]


def _outputs(prompts: list[list[int]], outs) -> dict[tuple[int, ...], list[int]]:
    return {tuple(p): list(o.outputs[0].token_ids) for p, o in zip(prompts, outs, strict=True)}


def _timed_generate(llm: LLM, prompts: list[list[int]], params: SamplingParams):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return outs, time.perf_counter() - start


def _oracle(future: dict[tuple[int, ...], list[int]], k: int, wrong: float, vocab: int, seed: int):
    """A ``Drafter.propose`` that drafts the target's own next tokens, some made wrong."""
    rng = random.Random(seed)

    def propose(self, running) -> None:
        for seq in running:
            if not drafting.draftable(seq):
                continue
            done = seq.num_output_tokens
            drafts = list(future[tuple(seq.prompt_token_ids)][done : done + k])
            for i, token in enumerate(drafts):
                if rng.random() < wrong:
                    drafts[i] = (token + 1 + rng.randrange(vocab - 1)) % vocab
            seq.draft_token_ids = drafts

    return propose


def run(args: argparse.Namespace) -> list[dict]:
    engine_args = dict(load_format="dummy", max_model_len=args.input_len + args.output_len + 16,
                       device=args.device, gpu_memory_utilization=0.6)  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    plain = LLM(args.config, **engine_args)
    vocab = plain.engine.model_config.vocab_size
    rows, baseline, futures = [], {}, {}
    for batch in args.batch_sizes:
        prompts = _prompts(batch, args.input_len, vocab, seed=batch)
        _timed_generate(plain, prompts, params)  # warm-up
        outs, seconds = _timed_generate(plain, prompts, params)
        baseline[batch] = seconds
        futures[batch] = _outputs(prompts, outs)
    del plain
    spec = {"method": "ngram", "num_speculative_tokens": max(args.k)}
    llm = LLM(args.config, speculative_config=spec, **engine_args)
    for batch in args.batch_sizes:
        prompts = [list(p) for p in futures[batch]]
        for k in args.k:
            for wrong in args.wrong:
                drafting.Drafter.propose = _oracle(futures[batch], k, wrong, vocab, seed=k)
                _timed_generate(llm, prompts, params)  # warm-up
                before = llm.engine.spec_stats.copy()
                outs, seconds = _timed_generate(llm, prompts, params)
                # float32 output is plain decoding's exactly (tests); in bf16 the verify step's
                # kernel may round a near-tie differently, so here the share is reported.
                got = _outputs(prompts, outs)
                identical = sum(got[p] == futures[batch][p] for p in got) / len(got)
                per_step = llm.engine.spec_stats.mean_since(before)
                speedup = baseline[batch] / seconds
                rows.append({"batch": batch, "k": k, "wrong": wrong, "tokens_per_step": per_step,
                             "speedup": speedup, "efficiency": speedup / per_step,
                             "plain_s": baseline[batch], "spec_s": seconds,
                             "identical_outputs": identical})  # fmt: skip
                print(f"batch {batch:>3} k {k} wrong {wrong:.2f}: {per_step:.2f} tok/step, "
                      f"speedup {speedup:.2f}x, efficiency {speedup / per_step:.2f}, "
                      f"identical outputs {identical:.0%}", flush=True)  # fmt: skip
    return rows


def print_thresholds(rows: list[dict]) -> None:
    """The break-even tokens per step at each batch size (where speculation starts to pay:
    ``min_tokens_per_step``), from the mean efficiency of its rows; a batch size at which even
    all-correct drafts lose is where ``disable_by_batch_size`` belongs."""
    for batch in sorted({r["batch"] for r in rows}):
        mine = [r for r in rows if r["batch"] == batch]
        efficiency = sum(r["efficiency"] for r in mine) / len(mine)
        best = max(r["speedup"] for r in mine)
        verdict = "speculation pays" if best > 1 else "no row pays: disable at this batch size"
        print(f"batch {batch:>3}: break-even {1 / efficiency:.2f} tokens/step "
              f"(mean efficiency {efficiency:.2f}); best speedup {best:.2f}x, {verdict}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="model config.json (dummy weights)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")],
                    default=[1, 8, 32], help="decode batch sizes")  # fmt: skip
    ap.add_argument("--k", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4, 8],
                    help="draft lengths")  # fmt: skip
    ap.add_argument("--wrong", type=lambda s: [float(x) for x in s.split(",")],
                    default=[0.0, 0.25], help="fractions of oracle drafts made wrong")  # fmt: skip
    ap.add_argument("--input-len", type=int, default=128, help="prompt tokens")
    ap.add_argument("--output-len", type=int, default=256, help="generated tokens")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    rows = run(args)
    print_thresholds(rows)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
