"""What the device drafter's ring lookup (``history_lookup``) costs as the ring grows with a
datastore, at batch 1 and 8, for rows that look up and rows that drafted from their own
tokens: the base scanned (no index) against the base searched through its suffix index
(kernels/suffix_search.py), the ring after it scanned in both (needs CUDA).

The scan gives every (row, 512 ring positions) a program: with a datastore of 16.8M tokens
that is 33k programs a row, every step; at 103M tokens it cost 614 µs at batch 1 on an H200
(RESULTS, eighteenth session), more than the 150M model's plain step. The search is one
program a row: for each n two K-ary searches and a range minimum. A row with drafts of its
own returns in both after loading its count. The base's tokens follow a Zipf law over the
vocabulary (code's are skewed: a frequent token's range is a large share of the index), and
the rows end in slices of it, so long matches occur.

    python benchmarks/history_scan_bench.py [--base-tokens 1048576,16777216,103000000]
        [--batch-sizes 1,8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parallm.engine.spec.history import SEPARATOR, TokenHistory  # noqa: E402
from parallm.kernels.history_lookup import history_lookup  # noqa: E402
from parallm.kernels.prompt_lookup import lookup_buffer  # noqa: E402


def make_ring(base_tokens: int, ring_tokens: int, vocab: int, seed: int) -> TokenHistory:
    """A ring of ``ring_tokens`` after a base of Zipf-distributed tokens (documents of about
    2,000 tokens) with its suffix index, random requests added until it wrapped."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, vocab + 1)
    base = rng.choice(vocab, base_tokens, p=weights / weights.sum()).astype(np.int32)
    base[rng.integers(0, base_tokens, max(1, base_tokens // 2000))] = SEPARATOR
    history = TokenHistory(ring_tokens, base)
    while not history.wrapped:
        history.add(rng.integers(0, vocab, int(rng.integers(1, ring_tokens // 4 + 2))).tolist())
    return history


def make_rows(history: TokenHistory, rows: int, width: int, own_share: float, seed: int):
    """Rows ending in a slice of the ring (so that long matches occur), and the prompt
    lookup's output: ``own_share`` of the rows have drafts of their own."""
    g = torch.Generator().manual_seed(seed)
    ring = history.ring[: history.used]
    tokens = torch.empty((rows, width), dtype=torch.int32)
    for b in range(rows):
        at = int(torch.randint(0, max(1, len(ring) - width), (1,), generator=g))
        tokens[b] = ring[at : at + width].clamp(min=0)
    lengths = torch.full((rows,), width, dtype=torch.int32)
    counts = (torch.rand(rows, generator=g) < own_share).to(torch.int32) * 2
    drafts = torch.zeros((rows, 8), dtype=torch.int32)
    return tokens, lengths, drafts, counts


def bench(fn) -> float:
    """Median µs per call of a CUDA graph of ``fn`` (launch cost left out)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return 1e3 * triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median")


def timed_call(history, tokens, lengths, drafts, counts, searched: bool):
    """A graph-safe lookup on device copies: the counts reset from their start first (the
    lookup writes them in place)."""
    t, n, d = tokens.cuda(), lengths.cuda(), drafts.cuda()
    start, c = counts.cuda(), counts.cuda()
    newest = lookup_buffer(tokens.shape[0], 8, "cuda")
    ring, state = history.device_ring, history.device_state
    index = history.device_index if searched else None

    def call() -> None:
        c.copy_(start)
        history_lookup(t, n, ring, state, d, c, 8, 2, 8, newest=newest, index=index)

    return call


def check_same_drafts(history, rows) -> None:
    """The scan and the search draft the same tokens for these rows (else exit 1)."""
    out = []
    for searched in (False, True):
        tokens, lengths, drafts, counts = (x.cuda() for x in rows)
        index = history.device_index if searched else None
        history_lookup(tokens, lengths, history.device_ring, history.device_state, drafts,
                       counts, 8, 2, 8, index=index)  # fmt: skip
        out.append((drafts.cpu(), counts.cpu()))
    (d0, c0), (d1, c1) = out
    if not (torch.equal(c0, c1) and torch.equal(d0, d1)):
        raise SystemExit(f"the search drafts differently from the scan: {c0} {c1}")


def time_all(args: argparse.Namespace) -> None:
    print(f"{'base tokens':>12} {'batch':>5} {'own':>4} {'scan µs':>9} {'search µs':>9}")
    for base_tokens in args.base_tokens:
        history = make_ring(base_tokens, args.ring_tokens, 8192, 0)
        history.to_device("cuda")
        for batch in args.batch_sizes:
            for own in (0.0, 0.5, 1.0):
                rows = make_rows(history, batch, 512, own, 1)
                check_same_drafts(history, rows)
                scan, search = (bench(timed_call(history, *rows, searched))
                                for searched in (False, True))  # fmt: skip
                print(f"{base_tokens:>12,} {batch:>5} {own:>4.1f} {scan:>9.1f} {search:>9.1f}",
                      flush=True)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    ap.add_argument("--base-tokens", type=ints, default=[1 << 20, 1 << 24, 103_000_000],
                    help="datastore sizes (the base before the ring)")  # fmt: skip
    ap.add_argument("--ring-tokens", type=int, default=1 << 20, help="the ring's own capacity")
    ap.add_argument("--batch-sizes", type=ints, default=[1, 8], help="rows a call")
    return ap


def main() -> None:
    args = build_parser().parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("history_scan_bench times CUDA graphs: it needs a GPU")
    time_all(args)


if __name__ == "__main__":
    main()
