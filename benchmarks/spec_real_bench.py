"""Speculative decoding on a real model and real prompts (issue 15, measure 2).

Each drafter runs on held-out code-completion prompts: Python files of the training corpus's
validation split, cut just after a ``def`` line, so the model completes the function. For each
drafter and batch size it reports the mean tokens a drafted sequence emits per step, the
output tokens per second, the speedup against plain decoding on the same prompts, and the share
of outputs identical to plain decoding's: 1 in float32; in half precision the verify step's
kernels and the decode graph's round differently, so a near-tied argmax may differ (a trained
code model has about 3% of greedy rows within one bf16 ulp of a tie), which changes the text,
not the speed measured. For each output that differs, it reports plain decoding's top-2
log-probability margin where the two part (``divergence_margins``): rounding parts them only at
near ties, so a wide margin there would mean a wrong verify step.

Every engine is loaded at once and timed in alternating rounds after an untimed pass
(``measure_rounds``): each speedup is a ratio taken in the same stretch of the machine's time,
with each round's ratio printed beside it.

    python benchmarks/spec_real_bench.py --target runs/code-model-150m/hf \
        --batch-sizes 1,8 --out spec_real.json

Drafters (``--methods``): ngram (prompt lookup in the sequence's own tokens, as vLLM's; the
engine's default adds the ring below), ngram_history (prompt lookup falling back to
a ring of the pass's earlier requests, ``--prompt-lookup-history-tokens``; each pass starts
with it empty), ngram_datastore (that, then the target's training data, ``--datastore``:
retrieval-based drafting), draft_model (``--draft-model``: the bundled
code model by default, which shares the target's tokenizer when the target was trained with
configs/train/code-model-150m.toml), layer_skip (the target's first ``--skip-layers`` layers)
and medusa (``--medusa-heads``: heads trained with ``parallm train`` and exported).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parallm import LLM, SamplingParams  # noqa: E402
from parallm.bundled import BUNDLED_MODEL_DIR  # noqa: E402
from parallm.data.corpus import is_held_out, read_corpus  # noqa: E402
from parallm.engine.spec.config import DEFAULT_HISTORY_TOKENS  # noqa: E402


def completion_prompts(
    corpus: str, val_fraction: float, tokenizer, count: int, max_len: int, seed: int
) -> list[list[int]]:
    """Token ids of ``count`` prompts: held-out files cut after a ``def`` line (its last
    ``max_len`` tokens), at most one per file, files chosen at random with ``seed``."""
    docs = [d for d in read_corpus(corpus) if is_held_out(d.name, val_fraction)]
    if not docs:
        raise SystemExit(f"corpus {corpus!r} has no held-out files at val_fraction {val_fraction}")
    rng = random.Random(seed)
    rng.shuffle(docs)
    prompts = []
    for doc in docs:
        lines = doc.text.splitlines(keepends=True)
        cuts = [i for i, line in enumerate(lines) if line.lstrip().startswith("def ") and i > 5]
        if not cuts:
            continue
        cut = rng.choice(cuts)
        ids = tokenizer.encode("".join(lines[: cut + 1]), add_special_tokens=False)
        prompts.append(ids[-max_len:])
        if len(prompts) == count:
            break
    if len(prompts) < count:
        print(f"only {len(prompts)} held-out files have a def to complete", file=sys.stderr)
    return prompts


def identical_share(outs: list[list[int]], plain_outs: list[list[int]]) -> float:
    """The share of outputs equal to plain decoding's, prompt by prompt."""
    if len(outs) != len(plain_outs):
        raise ValueError(f"{len(outs)} outputs against {len(plain_outs)} plain ones")
    return sum(a == b for a, b in zip(outs, plain_outs, strict=True)) / max(1, len(outs))


class Margins(NamedTuple):
    """A logprobs run's output tokens and its top-2 margin at each of them."""

    tokens: list[int]
    gaps: list[float]


def top2_gaps(llm: LLM, prompts: list[list[int]], max_tokens: int, batch: int) -> list[Margins]:
    """Plain decoding's margin at each output position, prompt by prompt: the log-probability
    of its greedy token minus that of the runner-up (untimed; logprobs change the step, so in
    half precision this run may itself part from the timed one at a near tie)."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=2)
    margins = []
    for i in range(0, len(prompts), batch):
        chunk = [{"prompt_token_ids": p} for p in prompts[i : i + batch]]
        for out in llm.generate(chunk, params, use_tqdm=False):
            position_gaps = []
            for position in out.outputs[0].logprobs:
                top = sorted((lp.logprob for lp in position.values()), reverse=True)
                position_gaps.append(top[0] - top[1] if len(top) > 1 else float("inf"))
            margins.append(Margins(list(out.outputs[0].token_ids), position_gaps))
    return margins


def divergence_gaps(
    outs: list[list[int]], plain_outs: list[list[int]], margins: list[Margins]
) -> list[float | None]:
    """For each output that differs from plain decoding's, plain decoding's top-2 margin at the
    first token where they part. A rounding difference parts them only at a near tie (a margin
    of about one unit in the last place of the logits' dtype); a wrong verify step would part
    them at any margin. None where the logprobs run had left the timed run's tokens before that
    point: its margins there belong to another text."""
    parted = []
    for out, plain, margin in zip(outs, plain_outs, margins, strict=True):
        if out == plain:
            continue
        at = next((i for i, (a, b) in enumerate(zip(out, plain, strict=False)) if a != b),
                  min(len(out), len(plain)))  # fmt: skip
        if margin.tokens[:at] != plain[:at]:
            parted.append(None)
        else:
            parted.append(margin.gaps[at] if at < len(margin.gaps) else float("inf"))
    return parted


def drafter_configs(args: argparse.Namespace, num_layers: int) -> dict[str, dict]:
    """``speculative_config`` of each requested method (and each k, labelled ``method k=K``,
    when several are asked for)."""
    ks = args.num_speculative_tokens
    if len(ks) == 1:
        return _method_configs(args, num_layers, ks[0])
    return {f"{m} k={k}": c for k in ks for m, c in _method_configs(args, num_layers, k).items()}


def _method_configs(args: argparse.Namespace, num_layers: int, k: int) -> dict[str, dict]:
    ngram = {
        "method": "ngram",
        "num_speculative_tokens": k,
        "prompt_lookup_min": args.prompt_lookup_min,
        "prompt_lookup_max": args.prompt_lookup_max,
        "prompt_lookup_history_tokens": 0,  # the sequence's own tokens alone, as vLLM's
    }
    configs = {
        "ngram": ngram,
        "ngram_history": {
            **ngram,
            "prompt_lookup_history_tokens": args.prompt_lookup_history_tokens,
        },  # fmt: skip
        "ngram_datastore": {
            **ngram,
            "prompt_lookup_history_tokens": args.prompt_lookup_history_tokens,
            "prompt_lookup_datastore": args.datastore,
        },  # fmt: skip
        "draft_model": {
            "method": "draft_model",
            "model": args.draft_model,
            "num_speculative_tokens": k,
        },  # fmt: skip
        "layer_skip": {
            "method": "layer_skip",
            "num_speculative_tokens": k,
            "num_layers": args.skip_layers or max(1, num_layers // 4),
        },  # fmt: skip
    }
    if args.medusa_heads:
        configs["medusa"] = {"method": "medusa", "model": args.medusa_heads,
                             "num_speculative_tokens": args.medusa_k or k}  # fmt: skip
    unknown = [m for m in args.methods if m not in configs]
    if unknown:
        raise SystemExit(f"--methods: unknown or unavailable {unknown}; available {list(configs)}")
    threshold = args.min_tokens_per_step
    if threshold is not None:
        threshold = threshold if threshold == "auto" else float(threshold)
        configs = {m: {**c, "min_tokens_per_step": threshold} for m, c in configs.items()}
    return {m: configs[m] for m in args.methods}


def timed_run(llm: LLM, prompts: list[list[int]], params: SamplingParams, batch: int,
              queue: bool = False):  # fmt: skip
    """Outputs of ``prompts`` run ``batch`` at a time, and the seconds it took. In waves
    (``batch`` prompts a call, each wave as long as its slowest request) or, with ``queue``,
    all submitted at once with ``batch`` running at a time (the engine's ``max_num_seqs``,
    lowered for the call): a finished request's place goes to the next, as on a server."""
    limits = llm.engine.scheduler.cfg
    waves = [prompts] if queue else [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
    outputs, most = [], limits.max_num_seqs
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    try:
        limits.max_num_seqs = min(batch, most)
        for wave in waves:
            outs = llm.generate([{"prompt_token_ids": p} for p in wave], params, use_tqdm=False)
            outputs += [list(o.outputs[0].token_ids) for o in outs]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    finally:
        limits.max_num_seqs = most
    return outputs, time.perf_counter() - start


def measure_rounds(
    engines: dict[str, LLM], prompts: list[list[int]], params: SamplingParams, batch: int,
    rounds: int, queue: bool = False,
) -> dict[str, tuple[list[list[int]], list[float]]]:  # fmt: skip
    """Each engine's outputs (its first timed pass) and its seconds in each round.

    Every engine first runs every prompt untimed: kernels compile for each shape the prompts
    bring and graphs are captured before any clock runs. Then ``rounds`` timed passes, the
    engines in turn, in reverse order every other round (A B B A): a drift in the machine's
    speed weighs on each engine alike. Prefix caches (and rings of earlier requests) are
    emptied before each pass, so each pass computes every prefill (and drafts only from its own
    earlier requests).
    """
    for llm in engines.values():
        reset_pass(llm)
        timed_run(llm, prompts, params, batch, queue)
    outputs: dict[str, list[list[int]]] = {}
    seconds: dict[str, list[float]] = {label: [] for label in engines}
    order = list(engines)
    for r in range(rounds):
        for label in order if r % 2 == 0 else order[::-1]:
            reset_pass(engines[label])
            outs, took = timed_run(engines[label], prompts, params, batch, queue)
            outputs.setdefault(label, outs)
            seconds[label].append(took)
    return {label: (outputs[label], seconds[label]) for label in engines}


def reset_pass(llm: LLM) -> None:
    """Empty ``llm``'s prefix cache and its drafter's ring of earlier requests (if any)."""
    llm.reset_prefix_cache()
    drafter = llm.engine.drafter
    if drafter is not None and drafter.history is not None:
        drafter.history.clear()


def run(args: argparse.Namespace) -> list[dict]:
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, got {args.rounds}")
    # A fixed KV budget each: the engines live side by side in one process. No engine runs
    # more sequences than the largest batch, so none captures graphs for more (unset, the
    # admission follows the GPU: graphs up to 512 sequences, each engine's start-up longer).
    engine_args = dict(dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                       kv_cache_memory=int(args.kv_cache_gib * 2**30),
                       max_num_seqs=max(args.batch_sizes))  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    target_config = json.loads((Path(args.target) / "config.json").read_text())
    drafters = drafter_configs(args, target_config["num_hidden_layers"])  # checked before loading
    engines = {"plain": LLM(args.target, **engine_args)}
    prompts = completion_prompts(args.corpus, args.val_fraction, engines["plain"].get_tokenizer(),
                                 args.num_prompts, args.prompt_len, args.seed)  # fmt: skip
    for label, spec in drafters.items():
        engines[label] = LLM(args.target, speculative_config=spec, **engine_args)
    rows = []
    try:
        for batch in args.batch_sizes:
            rows += _batch_rows(engines, drafters, prompts, params, batch, args)
    finally:
        for llm in engines.values():
            llm.close()
    return rows


def _batch_rows(
    engines: dict[str, LLM], drafters: dict[str, dict], prompts, params, batch: int,
    args: argparse.Namespace,
) -> list[dict]:  # fmt: skip
    """One row per drafter at ``batch``, each against plain decoding timed in the same rounds."""
    before = {label: engines[label].engine.spec_stats.copy() for label in drafters}
    steps_before = {label: _step_counts(engines[label]) for label in drafters}
    timings = measure_rounds(engines, prompts, params, batch, args.rounds, args.queue)
    # Counted over the warm-up pass too: the same prompts and outputs as the timed ones.
    plain_outs, plain_seconds = timings["plain"]
    plain_tokens = sum(map(len, plain_outs))
    plain_rate = _rate(plain_tokens, plain_seconds)
    print(f"plain       batch {batch:>3}: {plain_rate:8.1f} tok/s", flush=True)
    margins = top2_gaps(engines["plain"], prompts, args.max_tokens, batch)
    rows = []
    for label, spec in drafters.items():
        outs, seconds = timings[label]
        tokens = sum(map(len, outs))
        per_round = [(tokens / s) / (plain_tokens / p)
                     for s, p in zip(seconds, plain_seconds, strict=True)]  # fmt: skip
        row = {"method": spec["method"], "label": label, "batch": batch, "k": spec["num_speculative_tokens"],
               "tokens_per_step": engines[label].engine.spec_stats.mean_since(before[label]),
               "tokens_per_engine_step": _per_engine_step(engines[label], steps_before[label],
                                                          tokens * (1 + args.rounds)),
               "overlapped_steps": _overlapped_share(engines[label], steps_before[label]),
               "tok_s": _rate(tokens, seconds), "plain_tok_s": plain_rate,
               "speedup_rounds": per_round,
               "identical_outputs": identical_share(outs, plain_outs), "queue": args.queue,
               "divergence_margins": divergence_gaps(outs, plain_outs, margins),
               "prompts": len(prompts)}  # fmt: skip
        row["speedup"] = row["tok_s"] / row["plain_tok_s"]
        rows.append(row)
        worst = _parted_note(row["divergence_margins"])
        print(f"{label:<11} batch {batch:>3}: {row['tok_s']:8.1f} tok/s, "
              f"{row['tokens_per_step']:.2f} tok/step, {row['tokens_per_engine_step']:.2f} tok/engine step, {row['overlapped_steps']:.0%} overlapped, speedup {row['speedup']:.2f}x "
              f"(rounds {min(per_round):.2f}-{max(per_round):.2f}x), "
              f"identical outputs {row['identical_outputs']:.0%}{worst}", flush=True)  # fmt: skip
    return rows


def _step_counts(llm: LLM) -> tuple[int, int]:
    return llm.engine.num_steps, llm.engine.num_overlapped_steps


def _per_engine_step(llm: LLM, before: tuple[int, int], tokens: int) -> float:
    """``tokens`` over the engine steps since ``before`` (all sequences' tokens: at batch b a
    step emits up to b times more). Unlike ``tokens_per_step`` (a drafted sequence's steps
    only, as vLLM counts acceptance), steps without drafts count too: the prefills, and the
    device drafter's steps whose lookup found nothing (a verify step's cost, one token)."""
    steps = llm.engine.num_steps - before[0]
    return tokens / steps if steps else 0.0


def _overlapped_share(llm: LLM, before: tuple[int, int]) -> float:
    """Share of the steps since ``before`` that launched before their predecessor's tokens
    reached the host (verify-ahead, or the device drafter's staged steps)."""
    steps, overlapped = (now - then for now, then in zip(_step_counts(llm), before, strict=True))
    return overlapped / steps if steps else 0.0


def _rate(tokens: int, seconds: list[float]) -> float:
    """Tokens per second of a pass that produced ``tokens``, over passes taking ``seconds``."""
    return tokens * len(seconds) / sum(seconds)


def _parted_note(parted: list[float | None]) -> str:
    known = [m for m in parted if m is not None]
    note = f", widest margin parted {max(known):.3f}" if known else ""
    unknown = len(parted) - len(known)
    return note + (f" ({unknown} where the logprobs run had parted first)" if unknown else "")


def add_prompt_args(ap: argparse.ArgumentParser, corpus: str, val_fraction: float) -> None:
    """The prompt set's flags (``completion_prompts``' corpus and lengths) and the engine's."""
    ap.add_argument("--corpus", default=corpus, help="corpus whose held-out files give prompts")
    ap.add_argument("--val-fraction", type=float, default=val_fraction,
                    help="the model's training data.val_fraction (which files are held out)")  # fmt: skip
    ap.add_argument("--prompt-len", type=int, default=512, help="prompt tokens at most")
    ap.add_argument("--max-tokens", type=int, default=128, help="generated tokens at most")
    ap.add_argument("--max-model-len", type=int, default=1024, help="engine's max_model_len")
    ap.add_argument("--dtype", default="auto", help="model dtype")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")


def add_queue_arg(ap: argparse.ArgumentParser) -> None:
    """``timed_run``'s two ways of running a batch size."""
    ap.add_argument("--queue", action="store_true",
                    help="submit every prompt at once, a batch size's worth running at a time "
                         "(continuous batching, as a server under load); unset: in waves of "
                         "a batch size's prompts, each as long as its slowest request")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    ap.add_argument("--target", required=True, help="the target model's folder (HF format)")
    ap.add_argument("--methods", type=lambda s: s.split(","),
                    default=["ngram", "draft_model", "layer_skip"],
                    help="drafters to run: ngram, ngram_history, ngram_datastore, draft_model, "
                         "layer_skip, medusa (needs --medusa-heads)")  # fmt: skip
    ap.add_argument("--num-speculative-tokens", type=ints, default=[4],
                    help="k of each drafter; several (4,8) run each drafter once per k against "
                         "one plain baseline")  # fmt: skip
    ap.add_argument("--prompt-lookup-min", type=int, default=2, help="ngram's shortest n-gram")
    ap.add_argument("--prompt-lookup-max", type=int, default=5, help="ngram's longest n-gram")
    ap.add_argument("--prompt-lookup-history-tokens", type=int, default=DEFAULT_HISTORY_TOKENS,
                    help="ngram_history's ring of earlier requests, in tokens")  # fmt: skip
    ap.add_argument("--datastore", default="runs/data/python-8k",
                    help="ngram_datastore's dataset folder (the target's training data, as "
                         "`parallm train` prepared it), after the ngram_history ring")  # fmt: skip
    ap.add_argument("--draft-model", default=str(BUNDLED_MODEL_DIR), help="draft_model's model")
    ap.add_argument("--skip-layers", type=int, default=0,
                    help="layer_skip's draft layers (0: a quarter of the target's)")  # fmt: skip
    ap.add_argument("--min-tokens-per-step", default=None,
                    help='every drafter\'s min_tokens_per_step: a number, or "auto" (the '
                         "break-even the engine measures); unset: requests never pause")  # fmt: skip
    ap.add_argument("--medusa-heads", default="", help="exported Medusa heads folder")
    ap.add_argument(
        "--medusa-k", type=int, default=0, help="medusa's k (0: --num-speculative-tokens)"
    )
    add_prompt_args(ap, corpus="python", val_fraction=0.01)
    add_queue_arg(ap)
    ap.add_argument("--num-prompts", type=int, default=64, help="prompts per batch size")
    ap.add_argument("--batch-sizes", type=ints, default=[1, 8], help="requests run together")
    ap.add_argument("--seed", type=int, default=0, help="which held-out files and cut points")
    ap.add_argument("--rounds", type=int, default=2,
                    help="timed passes of every engine, in alternating order (A B B A)")  # fmt: skip
    ap.add_argument("--kv-cache-gib", type=float, default=1.0,
                    help="KV cache of each engine (all are loaded at once), GiB")  # fmt: skip
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    return ap.parse_args(argv)


def main() -> None:
    args = parse_args()
    rows = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
