"""What the device drafter's ring scan costs as the ring grows with a datastore, and a variant
that scans it with fewer programs (needs CUDA to time; checks run under the interpreter too).

The package's ``history_lookup`` gives every (row, 512 ring positions) a program: with a
datastore of 16.8M tokens that is 33k programs a row, 262k at batch 8, every step, even for
rows whose own lookup drafted (they return at once). ``looped``: ``PROGRAMS`` programs a row,
each striding over the ring and keeping its newest match per n in registers, published by one
atomic max at the end; the gather kernel is the package's. Both read every ring position of a
row that scans once.

Checks (before any timing; a variant that fails exits 1): the variant's drafts and counts
equal the package kernel's on random rings with a base, rows with and without drafts of their
own.

    python benchmarks/history_scan_bench.py [--base-tokens 1000000,16777216,103000000]
        [--batch-sizes 1,8] [--check-only --device cpu]  (TRITON_INTERPRET=1 on CPU)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parallm.engine.spec.history import SEPARATOR, TokenHistory  # noqa: E402
from parallm.kernels.history_lookup import (  # noqa: E402
    _BLOCK,
    gather_ring_drafts,
    history_lookup,
    match_ring,
)
from parallm.kernels.prompt_lookup import _NO_MATCH, lookup_buffer  # noqa: E402

_NONE = tl.constexpr(_NO_MATCH)
PROGRAMS = 128  # a row's programs in ``looped``: enough to fill an H100's 132 SMs at batch 1


@triton.jit(do_not_specialize=["stride_row", "capacity"])
def _looped_match_kernel(tokens_ptr, lengths_ptr, counts_ptr, ring_ptr, state_ptr, newest_ptr,
                         stride_row, capacity, MAX_N: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK: tl.constexpr, PROGRAMS: tl.constexpr):  # fmt: skip
    row = tl.program_id(0)
    size = tl.load(lengths_ptr + row)
    own = tl.load(counts_ptr + row)
    fill = tl.load(state_ptr)
    used = tl.load(state_ptr + 1)
    start = tl.load(state_ptr + 2)
    limit = tl.where(own == 0, used - 1, 0)
    base = tokens_ptr + row.to(tl.int64) * stride_row
    n = tl.arange(0, BLOCK_N)
    best = tl.full([BLOCK_N], _NONE, tl.int32)
    for first in range(tl.program_id(1) * BLOCK, limit, PROGRAMS * BLOCK):
        ends = first + tl.arange(0, BLOCK)
        live, matched, key = match_ring(base, size, ring_ptr, ends, limit, fill, start,
                                        capacity, MAX_N)  # fmt: skip
        hits = (matched[None, :] >= n[:, None]) & live[None, :]
        best = tl.maximum(best, tl.max(tl.where(hits, key[None, :], _NONE), axis=1))
    keep = (n >= 1) & (n <= MAX_N) & (best > _NONE)
    tl.atomic_max(newest_ptr + row * BLOCK_N + n, best, mask=keep, sem="relaxed")


def looped_lookup(tokens, lengths, ring, state, drafts, counts, num_tokens, min_n, max_n,
                  *, newest=None):  # fmt: skip
    """``history_lookup`` with ``_looped_match_kernel`` for its scan (same arguments)."""
    rows, capacity = tokens.shape[0], ring.shape[0]
    newest = lookup_buffer(rows, max_n, tokens.device) if newest is None else newest
    block_n = triton.next_power_of_2(max_n + 1)
    programs = min(PROGRAMS, triton.cdiv(capacity, _BLOCK))
    _looped_match_kernel[(rows, programs)](
        tokens, lengths, counts, ring, state, newest, tokens.stride(0), capacity, MAX_N=max_n,
        BLOCK_N=block_n, BLOCK=_BLOCK, PROGRAMS=programs,
    )  # fmt: skip
    gather_ring_drafts(lengths, counts, ring, newest, drafts, num_tokens, min_n, max_n)
    return drafts, counts


def make_ring(base_tokens: int, ring_tokens: int, vocab: int, seed: int) -> TokenHistory:
    """A ring of ``ring_tokens`` after a random base (documents of about 2,000 tokens), with
    random requests added until it wrapped."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, vocab, base_tokens, dtype=np.int32)
    base[rng.integers(0, base_tokens, max(1, base_tokens // 2000))] = SEPARATOR
    history = TokenHistory(ring_tokens, base, index_depth=0)  # the device scans; no host index
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


def run_both(history, tokens, lengths, drafts, counts, device):
    ring, state = history.device_ring, history.device_state
    out = []
    for fn in (history_lookup, looped_lookup):
        d, c = drafts.clone().to(device), counts.clone().to(device)
        fn(tokens.to(device), lengths.to(device), ring, state, d, c, 8, 2, 8)
        out.append((d.cpu(), c.cpu()))
    return out


def check(device: str, seeds: int = 4) -> bool:
    ok = True
    for seed in range(seeds):
        history = make_ring(3000 + 997 * seed, 2000, 5, seed)
        history.to_device(device)
        tokens, lengths, drafts, counts = make_rows(history, 6, 24, 0.3, seed)
        (d0, c0), (d1, c1) = run_both(history, tokens, lengths, drafts, counts, device)
        same = torch.equal(c0, c1) and torch.equal(d0, d1)
        ok &= same
        scanned = counts == 0
        print(f"check seed {seed}: {'same' if same else 'DIFFERENT'} drafts; "
              f"{int((c0[scanned] > 0).sum())} of {int(scanned.sum())} rows without drafts "
              "of their own drafted from the ring")  # fmt: skip
    return ok


def bench(fn) -> float:
    """Median µs per call of a CUDA graph of ``fn`` (launch cost left out)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return 1e3 * triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median")


def timed_call(fn, history, tokens, lengths, drafts, counts):
    """A graph-safe call of ``fn`` on device copies: the counts reset from their start first
    (the lookup writes them in place)."""
    t, n, d = tokens.cuda(), lengths.cuda(), drafts.cuda()
    start, c = counts.cuda(), counts.cuda()
    newest = lookup_buffer(tokens.shape[0], 8, "cuda")
    ring, state = history.device_ring, history.device_state

    def call() -> None:
        c.copy_(start)
        fn(t, n, ring, state, d, c, 8, 2, 8, newest=newest)

    return call


def time_all(args: argparse.Namespace) -> None:
    print(f"{'base tokens':>12} {'batch':>5} {'own':>4} {'package µs':>10} {'looped µs':>9} "
          f"{'GB/s (package)':>14}")  # fmt: skip
    for base_tokens in args.base_tokens:
        history = make_ring(base_tokens, args.ring_tokens, 8192, 0)
        history.to_device("cuda")
        for batch in args.batch_sizes:
            for own in (0.0, 0.5):
                rows = make_rows(history, batch, 512, own, 1)
                package, looped = (bench(timed_call(fn, history, *rows))
                                   for fn in (history_lookup, looped_lookup))  # fmt: skip
                scanning = int((rows[3] == 0).sum())
                rate = scanning * 4 * len(history.ring) / package / 1e3
                print(f"{base_tokens:>12,} {batch:>5} {own:>4.1f} {package:>10.1f} "
                      f"{looped:>9.1f} {rate:>14.0f}", flush=True)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    ap.add_argument("--base-tokens", type=ints, default=[1 << 20, 1 << 24, 103_000_000],
                    help="datastore sizes (the base before the ring)")  # fmt: skip
    ap.add_argument("--ring-tokens", type=int, default=1 << 20, help="the ring's own capacity")
    ap.add_argument("--batch-sizes", type=ints, default=[1, 8], help="rows a call")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for --check-only")
    ap.add_argument("--check-only", action="store_true", help="check, do not time")
    return ap


def main() -> None:
    args = build_parser().parse_args()
    if not check(args.device):
        raise SystemExit("looped differs from the package's kernel")
    if not args.check_only:
        time_all(args)


if __name__ == "__main__":
    main()
