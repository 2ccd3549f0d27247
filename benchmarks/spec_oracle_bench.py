"""Speculative decoding's system efficiency, independent of draft quality (issue 15, measure 1).

An oracle drafter (benchmark only) proposes the tokens the target will produce, each replaced
by a wrong token with probability ``--wrong``, at zero draft cost. For each batch size, draft
length k and wrong fraction it reports the mean tokens a drafted sequence emits per step and
the decode speedup against plain decoding (greedy, dummy weights, same prompts). A perfect
system would reach speedup = tokens per step; the ratio between them is the efficiency.

The oracle drafts what plain decoding produced, so the verify step must reproduce plain
decoding's tokens. Plain dummy weights give near-tied logits (a median top-2 gap of a few
percent): the verify step's kernels (prefill path, k+1 rows) and the decode graph's round
differently and pick different argmaxes from the first steps on. So the dummy model is made
peaked after load (:func:`peak_dummy_logits`, benchmark only; ``--raw-dummy-weights`` keeps
the plain ones): same shapes, same kernels, same cost, only the weight values change.

``--drafter device`` measures the engine's fastest path instead, the device drafter (prompt
lookup on the GPU, every verify step launched before the last one's tokens reach the host),
which no host oracle can feed. Peaked weights make the next token ``t + 1`` whatever came
before, so a prompt holding a counting run ``a, a+1, ...`` as long as the output, and ending
in ``a - 1``, makes prompt lookup itself the oracle: its continuation is the run. A wrong
draft is a run token replaced at random (``--wrong``); where the output passes it, the lookup
drafts it (rejected) or finds nothing. Efficiency then divides by the tokens each sequence
gets from an engine step (the batch's over its size), counting every engine step, since a
step whose lookup found nothing costs a verify step too.

    python benchmarks/spec_oracle_bench.py --config benchmarks/configs/llama-3.1-8b.json \
        --batch-sizes 1,8,32 --k 2,4,8 --wrong 0,0.25 [--drafter device] --out spec_oracle.json
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from spec_real_bench import identical_share  # noqa: E402

from parallm import LLM, SamplingParams  # noqa: E402
from parallm.engine.engine import LLMEngine  # noqa: E402
from parallm.engine.spec import drafting  # noqa: E402
from parallm.models import loader  # noqa: E402

# How much the embedding grows: its rows then outweigh what 32 random layers of the 8B shape
# add to the residual stream by far (float32 vs bfloat16 argmaxes agree on every row of a
# 32-layer probe from 100 on; raw dummy weights disagree on half of them).
PEAK_EMBEDDING_SCALE = 1e4


def peak_dummy_logits(model: torch.nn.Module, scale: float = PEAK_EMBEDDING_SCALE) -> None:
    """Make greedy decoding of a dummy model robust to rounding, without changing its compute:
    the LM head's row ``i`` becomes embedding row ``i - 1`` and the embedding grows by
    ``scale``, so the final hidden state is the current token's embedding plus a small
    perturbation and the next token is ``t + 1`` (mod vocabulary) with a top-2 gap of most of
    the top logit. Scaling the final norm (or anything else that scales all logits) would not
    do: the argmax is scale-invariant and rounding errors scale along. A tied head gets its own
    copy (same shape: the same GEMM). One process, one rank (the roll is over the whole
    vocabulary)."""
    embed = model.model.embed_tokens.weight
    head = model.lm_head
    with torch.no_grad():
        if head.weight is embed:
            head.weight = torch.nn.Parameter(torch.empty_like(embed), requires_grad=False)
        head.weight.copy_(embed.roll(1, dims=0))
        embed.mul_(scale)


def _install_peaked_dummy_weights() -> None:
    """Every dummy model this process loads from now on comes out peaked."""
    plain_init = loader._init_dummy

    def init(model: torch.nn.Module) -> None:
        plain_init(model)
        peak_dummy_logits(model)

    loader._init_dummy = init


def _prompts(batch: int, input_len: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(input_len)] for _ in range(batch)]


def _run_prompts(
    batch: int, input_len: int, run_len: int, vocab: int, seed: int, wrong: float
) -> list[list[int]]:  # fmt: skip
    """``--drafter device``'s prompts: random tokens, a counting run of ``run_len`` tokens
    (each replaced by a random one with probability ``wrong``), 8 random tokens, and the run's
    first token minus one. The random parts depend on ``seed`` alone, so every ``wrong`` gives
    prompts ending in the same token: the same peaked continuation."""
    rng, corrupt = random.Random(seed), random.Random(seed + 1)
    prompts = []
    for _ in range(batch):
        start = rng.randrange(10, vocab)
        run = [(start + i) % vocab for i in range(run_len)]
        run = [corrupt.randrange(10, vocab) if corrupt.random() < wrong else t for t in run]
        head = [rng.randrange(10, vocab) for _ in range(input_len)]
        gap = [rng.randrange(10, vocab) for _ in range(8)]
        prompts.append(head + run + gap + [(start - 1) % vocab])
    return prompts


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
    """A ``Drafter.propose`` that drafts the target's own next tokens, some made wrong; it
    also replaces prompt lookup (``drafting.propose_ngram``, which a verify step launched
    ahead calls over a sequence's tokens and the drafts in flight) by the same oracle."""
    rng = random.Random(seed)

    def next_tokens(prompt: tuple[int, ...], done: int, n: int) -> list[int]:
        drafts = list(future[prompt][done : done + n])
        for i, token in enumerate(drafts):
            if rng.random() < wrong:
                drafts[i] = (token + 1 + rng.randrange(vocab - 1)) % vocab
        return drafts

    def propose(self, running) -> None:
        for seq in running:
            if drafting.draftable(seq):
                done = seq.num_output_tokens
                seq.draft_token_ids = next_tokens(tuple(seq.prompt_token_ids), done, k)

    def lookup(token_ids, n, lookup_min, lookup_max) -> list[int]:
        for prompt in future:
            if tuple(token_ids[: len(prompt)]) == prompt:
                return next_tokens(prompt, len(token_ids) - len(prompt), min(n, k + 1))
        return []

    drafting.propose_ngram = lookup
    return propose


def _verify_replays(llm: LLM) -> int:
    """Verify steps replayed from CUDA graphs so far (0 without graphs)."""
    graphs = llm.engine.runner.verify_graphs
    return 0 if graphs is None else graphs.num_replays


def run(args: argparse.Namespace) -> list[dict]:
    if not args.raw_dummy_weights:
        _install_peaked_dummy_weights()
    if args.drafter == "device":
        return run_device(args)
    # No more sequences than the largest batch: no graphs captured for more (start-up).
    engine_args = dict(load_format="dummy", max_model_len=args.input_len + args.output_len + 16,
                       device=args.device, dtype=args.dtype, gpu_memory_utilization=0.6,
                       max_num_seqs=max(args.batch_sizes))  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    plain = LLM(args.config, **engine_args)
    vocab = plain.engine.model_config.vocab_size
    rows, baseline, futures = [], {}, {}
    for batch in args.batch_sizes:
        prompts = _prompts(batch, args.input_len, vocab, seed=batch)
        outs, baseline[batch], plain_ms = _warm_timed(plain, prompts, params)
        futures[batch] = _outputs(prompts, outs)
        # Per engine step (prefill steps included), to set beside bench latency's ms/token and
        # the verify steps' ms below: a verify step cannot cost less than a plain decode step.
        print(f"batch {batch:>3} plain: {plain_ms:.3f} ms per step", flush=True)
    plain.close()  # its memory goes to the speculative engines
    spec = {"method": "ngram", "num_speculative_tokens": max(args.k),
            "prompt_lookup_history_tokens": 0}  # the oracle drafts; no ring to fill  # fmt: skip
    # The oracle drafts on the host: the device drafter's own prompt lookup would replace it
    # after each request's first verify step (LLMEngine.enable_device_drafting).
    LLMEngine.enable_device_drafting = lambda self: False
    llm = LLM(args.config, speculative_config=spec, **engine_args)
    for batch in args.batch_sizes:
        prompts = [list(p) for p in futures[batch]]
        for k in args.k:
            for wrong in args.wrong:
                drafting.Drafter.propose = _oracle(futures[batch], k, wrong, vocab, seed=k)
                for _ in range(2):  # warm-up, as plain's
                    _timed_generate(llm, prompts, params)
                before = llm.engine.spec_stats.copy()
                replays, steps = _verify_replays(llm), llm.engine.num_steps
                outs, seconds = _timed_generate(llm, prompts, params)
                spec_steps = max(1, llm.engine.num_steps - steps)
                graphed = (_verify_replays(llm) - replays) / spec_steps
                # Output is plain decoding's while no logits are near ties (peaked weights; in
                # float32 always): anything below 1 means the oracle's drafts were wrong.
                got = _outputs(prompts, outs)
                identical = sum(got[p] == futures[batch][p] for p in got) / len(got)
                per_step = llm.engine.spec_stats.mean_since(before)
                speedup = baseline[batch] / seconds
                rows.append({"batch": batch, "k": k, "wrong": wrong, "tokens_per_step": per_step,
                             "speedup": speedup, "efficiency": speedup / per_step,
                             "plain_s": baseline[batch], "spec_s": seconds,
                             "spec_ms_per_step": 1e3 * seconds / spec_steps,
                             "identical_outputs": identical,
                             "graph_verify_share": graphed})  # fmt: skip
                print(f"batch {batch:>3} k {k} wrong {wrong:.2f}: {per_step:.2f} tok/step, "
                      f"speedup {speedup:.2f}x, efficiency {speedup / per_step:.2f}, "
                      f"{1e3 * seconds / spec_steps:.3f} ms per step, "
                      f"identical outputs {identical:.0%}, steps from verify graphs "
                      f"{graphed:.0%}", flush=True)  # fmt: skip
    return rows


def run_device(args: argparse.Namespace) -> list[dict]:
    """``--drafter device``: plain decoding of the counting-run prompts, then for each k an
    engine whose prompt lookup drafts (n of 1 to 2) over prompts with each wrong fraction."""
    if args.raw_dummy_weights:
        raise SystemExit("--drafter device needs peaked weights (no --raw-dummy-weights)")
    run_len = args.output_len + max(args.k) + 2
    engine_args = dict(load_format="dummy", device=args.device, dtype=args.dtype,
                       max_model_len=args.input_len + run_len + args.output_len + 32,
                       gpu_memory_utilization=0.6, max_num_seqs=max(args.batch_sizes))  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    plain = LLM(args.config, **engine_args)
    vocab = plain.engine.model_config.vocab_size
    baseline, plain_outs = {}, {}
    for batch in args.batch_sizes:
        prompts = _run_prompts(batch, args.input_len, run_len, vocab, batch, 0.0)
        outs, baseline[batch], ms = _warm_timed(plain, prompts, params)
        plain_outs[batch] = [list(o.outputs[0].token_ids) for o in outs]
        print(f"batch {batch:>3} plain: {ms:.3f} ms per step", flush=True)
    plain.close()  # its memory goes to the speculative engines
    rows = []
    for k in args.k:
        spec = {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 1,
                "prompt_lookup_max": 2}  # fmt: skip
        llm = LLM(args.config, speculative_config=spec, **engine_args)
        for batch in args.batch_sizes:
            for wrong in args.wrong:
                prompts = _run_prompts(batch, args.input_len, run_len, vocab, batch, wrong)
                rows.append(_device_row(llm, prompts, params, plain_outs[batch], baseline[batch],
                                        {"batch": batch, "k": k, "wrong": wrong}))  # fmt: skip
        llm.close()  # or the next k's engine starts with less memory
    return rows


def _warm_timed(llm: LLM, prompts: list[list[int]], params: SamplingParams):
    """Outputs, seconds and ms per engine step of a run after two warm-ups (the second's
    prefills hit the prefix cache, as the timed run's do)."""
    for _ in range(2):
        _timed_generate(llm, prompts, params)
    steps = llm.engine.num_steps
    outs, seconds = _timed_generate(llm, prompts, params)
    return outs, seconds, 1e3 * seconds / max(1, llm.engine.num_steps - steps)


def _device_row(llm: LLM, prompts, params, want: list[list[int]], plain_s: float, row: dict):
    before = llm.engine.spec_stats.copy()
    overlapped, steps0 = llm.engine.num_overlapped_steps, llm.engine.num_steps
    outs, seconds, ms = _warm_timed(llm, prompts, params)
    steps = llm.engine.num_steps - steps0  # the three runs'
    got = [list(o.outputs[0].token_ids) for o in outs]
    per_engine_step = 3 * sum(map(len, got)) / max(1, steps)
    # Efficiency is the speedup over the tokens a step gives each sequence (a plain step
    # gives one): the batch's tokens per step over its size.
    per_sequence = per_engine_step / len(prompts)
    speedup = plain_s / seconds
    row.update(tokens_per_step=llm.engine.spec_stats.mean_since(before),
               tokens_per_engine_step=per_engine_step, speedup=speedup,
               efficiency=speedup / per_sequence, spec_s=seconds, plain_s=plain_s,
               spec_ms_per_step=ms,
               overlapped_steps=(llm.engine.num_overlapped_steps - overlapped) / max(1, steps),
               identical_outputs=identical_share(got, want))  # fmt: skip
    print(f"batch {row['batch']:>3} k {row['k']} wrong {row['wrong']:.2f}: "
          f"{per_engine_step:.2f} tok/engine step ({row['tokens_per_step']:.2f} a drafted one), "
          f"speedup {speedup:.2f}x, efficiency {row['efficiency']:.2f}, {ms:.3f} ms per step, "
          f"{row['overlapped_steps']:.0%} overlapped, identical outputs "
          f"{row['identical_outputs']:.0%}", flush=True)  # fmt: skip
    return row


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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    ap.add_argument("--config", required=True, help="model config.json (dummy weights)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--dtype", default="auto",
                    help="auto (the config's torch_dtype), bfloat16, float16 or float32")  # fmt: skip
    ap.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")],
                    default=[1, 8, 32], help="decode batch sizes")  # fmt: skip
    ap.add_argument("--k", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4, 8],
                    help="draft lengths")  # fmt: skip
    ap.add_argument("--wrong", type=lambda s: [float(x) for x in s.split(",")],
                    default=[0.0, 0.25], help="fractions of oracle drafts made wrong")  # fmt: skip
    ap.add_argument("--input-len", type=int, default=128, help="prompt tokens")
    ap.add_argument("--output-len", type=int, default=256, help="generated tokens")
    ap.add_argument("--drafter", choices=["host", "device"], default="host",
                    help="host: the oracle's drafts on the host (the host drafter's path); "
                         "device: counting-run prompts that make prompt lookup the oracle "
                         "(the device drafter's path on CUDA with async scheduling)")  # fmt: skip
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--raw-dummy-weights", action="store_true",
                    help="keep the plain dummy weights (near-tied logits: in bf16 the oracle's "
                         "drafts stop matching); unset, they are peaked (peak_dummy_logits)")  # fmt: skip
    return ap


def main() -> None:
    args = build_parser().parse_args()
    rows = run(args)
    print_thresholds(rows)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
