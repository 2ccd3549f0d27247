"""Prompt lookup's yield offline: tokens an engine step for each lookup variant.

The yield is computed from the target's own greedy outputs.

Greedy speculation is lossless, so the tokens a run emits are plain decoding's, and which
drafts are accepted follows from them alone: at each step the drafter proposes from the
prompt and the tokens emitted so far, the drafts that equal the next plain tokens are kept,
and one more token comes from the verify step. This replays that walk for many lookup
variants over one set of plain outputs, so comparing them costs no GPU time and no timing
noise. A step costs about the same whatever its drafts (the verify shape is fixed in device
mode, where a failed lookup's rows are fillers), so tokens a step is the speedup's factor.

Variants: ``k`` drafts; ``min_n``..``max_n`` (the n-gram sizes tried, longest first);
``earliest`` (vLLM's: the first earlier occurrence of the n-gram, its drafts cut short where
the sequence ends) or ``latest`` (the most recent one, the engine's ``propose_ngram``, whose
drafts repeat a run that the sequence ends in, which is what looking up again from the
context plus the drafts gave; docs/PERF_NOTES.md); ``history``: where the request's own
tokens give no drafts, the latest occurrence in the earlier requests' prompts and outputs (the
prompts replayed in order, as a server would have served them; the engine's ``TokenHistory``
with ``prompt_lookup_history_tokens`` large enough to hold them all, n from 8 down to 2 since
across requests a single token says little), as suffix decoding (Oliaro et al., 2024) drafts
from a server's past outputs; ``datastore`` (with ``--datastore DIR``): after that, the training
split of a dataset ``parallm train`` prepared (the engine's ``prompt_lookup_datastore``, laid
before the ring: retrieval-based drafting, REST, He et al., 2024). ``branches`` (with the ring):
several candidate chains verified together as one draft tree, the accepted tokens those of the
chain that matches longest (REST's and SGLang's n-gram trees): the variant's own chain, the
ring's and datastore's newest continuation, the datastore's most frequent paths, then the
request's other continuations (``branch_chains``; "2L": the first two alone, the device
drafter's two lookups); "nodes" counts the tree's tokens a step, shared prefixes once, which
is what a verify step computes.

    python benchmarks/ngram_acceptance.py [--model runs/code-model-150m/hf --corpus python
        --val-fraction 0.01 --datastore runs/data/python-8k] [--k 4,8] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from spec_real_bench import add_prompt_args, completion_prompts  # noqa: E402

from parallm import LLM, SamplingParams  # noqa: E402
from parallm.bundled import BUNDLED_MODEL_DIR  # noqa: E402
from parallm.engine.spec.datastore import load_datastore  # noqa: E402
from parallm.engine.spec.history import SEPARATOR, TokenHistory, history_ngram_range  # noqa: E402
from parallm.engine.spec.ngram import propose_ngram  # noqa: E402
from parallm.engine.spec.suffix_index import IndexWalk, SuffixIndex  # noqa: E402

OCCURRENCES = ("earliest", "latest")
MAJORITY_SAMPLE = 256  # occurrences of a datastore n-gram read for its most frequent paths


def propose_earliest(tokens: list[int], num_tokens: int, min_n: int, max_n: int) -> list[int]:
    """Prompt lookup with the first earlier occurrence of the n-gram (vLLM's policy): the
    bench's own, so that it compares the two policies whatever the engine's is."""
    size = len(tokens)
    longest = min(max_n, size - 1)
    if num_tokens < 1 or min_n < 1 or longest < min_n:
        return []
    words = np.asarray(tokens, dtype=np.int32).tobytes()
    limit = (size - 1) * 4  # wholly before the last token
    for n in range(longest, min_n - 1, -1):
        pattern = words[(size - n) * 4 :]
        at = words.find(pattern, 0, limit)
        while at >= 0 and at % 4:  # a byte match straddling two tokens is none
            at = words.find(pattern, at + 1, limit)
        if at >= 0:
            start = at // 4 + n
            return tokens[start : min(start + num_tokens, size)]
    return []


def draft(tokens: list[int], k: int, min_n: int, max_n: int, occurrence: str) -> list[int]:
    """The variant's drafts after ``tokens`` (at most ``k``)."""
    lookup = propose_earliest if occurrence == "earliest" else propose_ngram
    return list(lookup(tokens, k, min_n, max_n))[:k]


def own_continuations(tokens: list[int], k: int, min_n: int, max_n: int, limit: int):
    """Distinct continuations (up to ``k`` tokens) of the context's last n tokens in its own
    earlier tokens, the longest n first and, within an n, the newest occurrence first."""
    found: list[list[int]] = []
    array = np.asarray(tokens, dtype=np.int32)
    size = len(array)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(array[: size - 1], n)
        for at in np.flatnonzero((windows == array[size - n :]).all(axis=1))[::-1]:
            chain = tokens[at + n : at + n + k]
            if chain not in found:
                found.append(chain)
                if len(found) == limit:
                    return found
    return found


def majority_paths(index: SuffixIndex, context: list[int], k: int, limit: int):
    """REST's candidates: the continuations of the longest suffix of ``context`` that the
    datastore's index holds (an even sample of ``MAJORITY_SAMPLE`` occurrences), read off as
    the most frequent path under each of the ``limit`` most frequent first tokens."""
    walk, span = IndexWalk(index, context), None
    for n in range(1, min(index.depth, len(context)) + 1):
        if walk.end(n) < 0:
            break
        span = (walk.lo, walk.hi)
    if span is None:
        return []
    entries = np.linspace(span[0], span[1] - 1, min(MAJORITY_SAMPLE, span[1] - span[0]))
    ends = len(index.tokens) - 1 - index.order[entries.astype(np.int64)].astype(np.int64)
    chains = []
    for end in ends:
        chain = index.tokens[end + 1 : end + 1 + k].tolist()
        chain = chain[: chain.index(SEPARATOR)] if SEPARATOR in chain else chain
        if chain:
            chains.append(chain)
    paths = []
    for first, _ in Counter(c[0] for c in chains).most_common(limit):
        path, group = [first], [c for c in chains if c[0] == first]
        while len(path) < k:
            group = [c for c in group if len(c) > len(path) and c[: len(path)] == path]
            if not group:
                break
            path.append(Counter(c[len(path)] for c in group).most_common(1)[0][0])
        paths.append(path)
    return paths


def branch_chains(context: list[int], variant: dict, history: TokenHistory) -> list[list[int]]:
    """Up to ``variant["branches"]`` chains to verify together: the variant's own chain, the
    ring's (and datastore's) newest continuation, then (``tree_sources`` "all") the
    datastore's most frequent paths and the request's other continuations, in that order; one
    that repeats an earlier one or a prefix of it is dropped. "lookups" keeps the first two
    alone: what the device drafter's two lookup kernels give."""
    k, low, high, limit = variant["k"], variant["min_n"], variant["max_n"], variant["branches"]
    sources = [
        [draft(context, k, low, high, variant["occurrence"])],
        [history.lookup(context, k, *history_ngram_range(low, high))],
    ]
    if variant.get("tree_sources", "all") == "all":
        if history.index is not None:
            sources.append(majority_paths(history.index, context, k, limit))
        sources.append(own_continuations(context, k, low, high, limit))
    chains: list[list[int]] = []
    for chain in itertools.chain.from_iterable(sources):
        if chain and not any(c[: len(chain)] == chain for c in chains):
            chains.append(chain)
            if len(chains) == limit:
                break
    return chains


def tree_nodes(chains: list[list[int]]) -> int:
    """The draft tree's tokens: every distinct prefix of the chains once."""
    return len({tuple(c[: i + 1]) for c in chains for i in range(len(c))})


def walk(
    prompt: list[int], output: list[int], variant: dict, history: TokenHistory | None = None
) -> tuple[int, int, int, int]:
    """``(steps, drafted steps, accepted drafts, draft tree nodes)`` of a greedy run that
    emits ``output`` after ``prompt``; the prefill's step, which emits the first token,
    included. ``history``: the earlier requests, drafted from where the request's own tokens
    give nothing (or, with branches, verified beside them)."""
    steps, drafted, accepted, nodes, done = 1, 0, 0, 0, 1
    while done < len(output):
        context = prompt + output[:done]
        if variant.get("branches", 1) > 1 and history is not None:
            chains = branch_chains(context, variant, history)
        else:
            chains = [draft(context, variant["k"], variant["min_n"], variant["max_n"],
                            variant["occurrence"])]  # fmt: skip
            if not chains[0] and history is not None:
                n_range = history_ngram_range(variant["min_n"], variant["max_n"])
                chains = [history.lookup(context, variant["k"], *n_range)]
        future = output[done : done + variant["k"]]
        kept = max(_matched(c, future) for c in chains) if chains else 0
        steps += 1
        drafted += any(chains)
        accepted += kept
        nodes += tree_nodes(chains)
        done += kept + 1
    return steps, drafted, accepted, nodes


def _matched(drafts: list[int], future: list[int]) -> int:
    """How many leading drafts equal the tokens plain decoding emits next (``future``)."""
    return next((i for i, (a, b) in enumerate(zip(drafts, future, strict=False)) if a != b),
                min(len(drafts), len(future)))  # fmt: skip


def variants(args: argparse.Namespace) -> list[dict]:
    # The datastore comes after the ring: only with it.
    sources = [(False, False), (True, False)] + ([(True, True)] if args.datastore else [])
    grid = itertools.product(args.k, args.min_n, args.max_n, OCCURRENCES, sources)
    chains = [
        {"k": k, "min_n": lo, "max_n": hi, "occurrence": occ, "history": hist,
         "datastore": store, "branches": 1, "tree_sources": None}
        for k, lo, hi, occ, (hist, store) in grid
        if lo <= hi
    ]  # fmt: skip
    # Trees beside the engine's chain drafter (latest occurrence), with the ring.
    ring = [v for v in chains if v["history"] and v["occurrence"] == "latest"]
    trees = [{**v, "branches": b, "tree_sources": "all"} for v in ring
             for b in args.branches if b > 1]  # fmt: skip
    if trees:  # and the two chains the device drafter's kernels would give
        trees += [{**v, "branches": 2, "tree_sources": "lookups"} for v in ring]
    return chains + trees


def score(
    prompts: list[list[int]],
    outputs: list[list[int]],
    variant: dict,
    store: np.ndarray | None,
    rings: dict | None = None,
) -> dict:
    """The variant's counts over the prompts in order. ``rings``: histories kept from one
    variant to the next (emptied first; a datastore's index is built once)."""
    steps = drafted = accepted = nodes = tokens = 0
    history = _history(prompts, outputs, variant, store, {} if rings is None else rings)
    for prompt, output in zip(prompts, outputs, strict=True):
        s, d, a, n = walk(prompt, output, variant, history)
        if history is not None:
            history.add(prompt + output)
        steps, drafted, accepted, nodes = steps + s, drafted + d, accepted + a, nodes + n
        tokens += len(output)
    return {**variant, "tokens_per_step": tokens / steps,
            "tokens_per_drafted_step": 1 + accepted / drafted if drafted else 0.0,
            "drafted_share": drafted / steps, "nodes_per_step": nodes / steps,
            "steps": steps, "tokens": tokens}  # fmt: skip


def _history(prompts, outputs, variant: dict, store: np.ndarray | None, rings: dict):
    """The variant's empty ring (None without one), large enough never to wrap: every earlier
    request stays; after the datastore when the variant drafts from it."""
    if not variant["history"]:
        return None
    depth = history_ngram_range(variant["min_n"], variant["max_n"])[1]
    key = (variant["datastore"], depth)
    if key not in rings:
        capacity = sum(len(p) + len(o) + 1 for p, o in zip(prompts, outputs, strict=True))
        base = store if variant["datastore"] else None
        rings[key] = TokenHistory(max(2, capacity), base, depth)
    rings[key].clear()
    return rings[key]


def plain_outputs(args: argparse.Namespace) -> tuple[list[list[int]], list[list[int]]]:
    llm = LLM(args.model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len)
    prompts = completion_prompts(args.corpus, args.val_fraction, llm.get_tokenizer(),
                                 args.num_prompts, args.prompt_len, args.seed)  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    llm.close()
    return prompts, [list(o.outputs[0].token_ids) for o in outs]


def run(args: argparse.Namespace) -> list[dict]:
    prompts, outputs = plain_outputs(args)
    store = None
    if args.datastore:
        vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
        store = load_datastore(args.datastore, vocab, args.model)
    rings: dict = {}
    rows = [score(prompts, outputs, v, store, rings) for v in variants(args)]
    print(f"{len(prompts)} prompts, {sum(map(len, outputs))} plain tokens"
          + (f"; a datastore of {len(store):,} tokens" if store is not None else ""))  # fmt: skip
    print(f"{'k':>2} {'n':>5} {'occurrence':>10} {'history':>7} {'store':>5} "
          f"{'branches':>8} {'tok/step':>9} {'tok/drafted':>11} {'drafted':>8} "
          f"{'nodes':>6}")  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["k"], -r["tokens_per_step"])):
        print(f"{r['k']:>2} {r['min_n']:>2}-{r['max_n']:<2} {r['occurrence']:>10} "
              f"{'yes' if r['history'] else 'no':>7} "
              f"{'yes' if r['datastore'] else 'no':>5} {_branches(r):>8} "
              f"{r['tokens_per_step']:>9.3f} {r['tokens_per_drafted_step']:>11.3f} "
              f"{r['drafted_share']:>8.1%} {r['nodes_per_step']:>6.1f}")  # fmt: skip
    return rows


def _branches(row: dict) -> str:
    """The branches column: the chain count, "L" where the tree holds the two lookups alone."""
    return f"{row['branches']}{'L' if row['tree_sources'] == 'lookups' else ''}"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    ap.add_argument("--model", default=str(BUNDLED_MODEL_DIR), help="target model folder")
    add_prompt_args(ap, corpus="stdlib", val_fraction=0.02)  # the bundled model's held-out files
    ap.add_argument("--num-prompts", type=int, default=64, help="prompts")
    ap.add_argument("--seed", type=int, default=0, help="which held-out files")
    ap.add_argument("--k", type=_ints, default=[4, 8], help="draft lengths")
    ap.add_argument("--min-n", type=_ints, default=[1, 2, 3], help="prompt_lookup_min values")
    ap.add_argument("--max-n", type=_ints, default=[3, 5, 8], help="prompt_lookup_max values")
    ap.add_argument("--branches", type=_ints, default=[1],
                    help="chains verified together as a tree (1: the chain drafter alone); "
                         "each value above 1 adds the ring variants' trees, and then a tree "
                         'of the two lookups alone ("2L": own and newest earlier)')  # fmt: skip
    ap.add_argument("--datastore", default=None,
                    help="a dataset folder (the model's training data, as `parallm train` "
                         "prepared it): adds the variants that draft from it after the ring")  # fmt: skip
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    return ap


def main() -> None:
    args = build_parser().parse_args()
    rows = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
