"""Paged prefill/decode Triton attention against their PyTorch twins, run in float64.

Without CUDA the kernels run under the Triton interpreter (see ``triton_interpreter``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest  # noqa: E402
import torch
from triton_interpreter import check_interpreter_suite  # before triton: sets the interpreter

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from parallm.kernels import paged_decode, paged_kv, paged_prefill  # noqa: E402
from parallm.kernels.paged_decode import (  # noqa: E402
    decode_num_splits,
    longest_first,
    new_split_counters,
    paged_decode_attention,
)
from parallm.kernels.paged_prefill import (  # noqa: E402
    paged_prefill_attention,
    prefill_tiles,
    prefill_tokens_per_tile,
    split_prefill_tiles,
)
from parallm.kernels.reference import (  # noqa: E402
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
)

# Both triton's own helpers and our kernels must have been built in interpreter mode.
INTERPRETING = isinstance(tl.zeros, InterpretedFunction) and isinstance(
    paged_prefill._prefill_kernel, InterpretedFunction
)
OLD_INTERPRETER = "interpreter of this triton cannot loop to a loaded bound under numpy 2"


@triton.jit
def _loop_to_loaded_bound(ptr):
    for i in range(0, tl.load(ptr)):
        tl.store(ptr + 1, i)


def _interpreter_loops_work() -> bool:
    # Older interpreters (triton 3.6) call int() on 1-element arrays, which numpy 2 rejects.
    try:
        _loop_to_loaded_bound[(1,)](torch.tensor([2, 0], dtype=torch.int32))
    except Exception:
        return False
    return True


INTERPRETER_WORKS = INTERPRETING and _interpreter_loops_work()
interpreter_test = pytest.mark.skipif(
    not INTERPRETER_WORKS,
    reason=OLD_INTERPRETER
    if INTERPRETING
    else "triton not in interpreter mode here; run by the subprocess test",
)
requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or INTERPRETING, reason="needs a CUDA device, compiled kernels"
)


@pytest.fixture
def force_splits(monkeypatch):
    """``force(n)``: decode cuts every context into ``n`` splits from then on (the split and
    in-kernel merge path on shapes that the heuristic would run in one split)."""

    def force(n: int) -> None:
        monkeypatch.setattr(paged_decode, "decode_num_splits", lambda *args, **kw: n)

    return force


def make_paged_case(
    lens: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: str,
    seed: int = 0,
) -> dict:
    """Random paged cache for sequences given as (q_len, seq_len).

    Blocks are scattered over a cache twice the needed size, in random order. Every slot
    not holding a context token is NaN, so reading it (or the padding block 0) shows up in
    the output.
    """
    gen = torch.Generator().manual_seed(seed)
    pages_per_seq = [math.ceil(seq_len / block_size) for _, seq_len in lens]
    num_blocks = 2 * sum(pages_per_seq) + 2
    ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    max_pages = max(pages_per_seq) + 1
    block_tables = torch.zeros(len(lens), max_pages, dtype=torch.int32)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"))
    v_cache = torch.full(shape, float("nan"))
    for b, (_, seq_len) in enumerate(lens):
        pages = torch.tensor([ids.pop() for _ in range(pages_per_seq[b])], dtype=torch.int32)
        block_tables[b, : len(pages)] = pages
        positions = torch.arange(seq_len)
        slots = pages[positions // block_size].long() * block_size + positions % block_size
        for cache in (k_cache, v_cache):
            cache.view(-1, num_kv_heads, head_dim)[slots] = torch.randn(
                seq_len, num_kv_heads, head_dim, generator=gen
            )
    q_lens = [q_len for q_len, _ in lens]
    query_start_loc = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen)
    return {
        "q": q.to(device, dtype),
        "k_cache": k_cache.to(device, dtype),
        "v_cache": v_cache.to(device, dtype),
        "block_tables": block_tables.to(device),
        "query_start_loc": query_start_loc.to(device),
        "seq_lens": torch.tensor([s for _, s in lens], dtype=torch.int32, device=device),
        "scale": head_dim**-0.5,
    }


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def _float64(case: dict) -> dict:
    """The case with q and the caches in float64: the twins then give the exact attention."""
    return {k: v.double() if k in ("q", "k_cache", "v_cache") else v for k, v in case.items()}


def prefill_ref(case: dict, max_query_len: int) -> torch.Tensor:
    c = _float64(case)
    return paged_prefill_attention_ref(
        c["q"], c["k_cache"], c["v_cache"], c["block_tables"], c["query_start_loc"],
        c["seq_lens"], max_query_len, c["scale"],
    )  # fmt: skip


def decode_ref(case: dict, max_seq_len: int) -> torch.Tensor:
    c = _float64(case)
    return paged_decode_attention_ref(
        c["q"], c["k_cache"], c["v_cache"], c["block_tables"], c["seq_lens"], c["scale"],
        max_seq_len,
    )  # fmt: skip


def _poisoned_like(q: torch.Tensor) -> torch.Tensor:
    return torch.full_like(q, float("nan"))


def check_prefill(lens, num_heads, num_kv_heads, head_dim, block_size, dtype, device, tol):
    case = make_paged_case(lens, num_heads, num_kv_heads, head_dim, block_size, dtype, device)
    out = paged_prefill_attention(
        case["q"],
        case["k_cache"],
        case["v_cache"],
        case["block_tables"],
        case["query_start_loc"],
        case["seq_lens"],
        max(q for q, _ in lens),
        case["scale"],
        out=_poisoned_like(case["q"]),
    )
    ref = prefill_ref(case, max(q for q, _ in lens))
    assert out.dtype == case["q"].dtype and out.shape == case["q"].shape
    assert torch.isfinite(out).all()
    assert _rel_err(out, ref) < tol


def check_prefill_tiles(lens, num_heads, num_kv_heads, head_dim, dtype, device, tol, bound):
    """The tile-table launch (a grid fixed by ``bound``, spare tiles idle, as a captured graph
    runs it) gives the standard launch's output for the same ``max_query_len`` bit for bit,
    and the twin's within ``tol``."""
    case = make_paged_case(lens, num_heads, num_kv_heads, head_dim, 16, dtype, device, seed=3)
    args = [case[k] for k in ("q", "k_cache", "v_cache", "block_tables", "query_start_loc",
                              "seq_lens")]  # fmt: skip
    q = case["q"]
    per_tile = prefill_tokens_per_tile(q.shape[2], q.shape[1], num_kv_heads, q.dtype, q.device,
                                       bound)  # fmt: skip
    needed = sum(-(-q // per_tile) for q, _ in lens)
    table = prefill_tiles([q for q, _ in lens], per_tile, needed + 5)
    tiles = torch.from_numpy(table).to(device)
    got = paged_prefill_attention(*args, bound, case["scale"], out=_poisoned_like(case["q"]),
                                  tiles=tiles)  # fmt: skip
    want = paged_prefill_attention(*args, bound, case["scale"], out=_poisoned_like(case["q"]))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert _rel_err(got, prefill_ref(case, bound)) < tol


def check_split_tiles(lens, num_heads, num_kv_heads, head_dim, dtype, device, tol, bound):
    """The two launches of a captured mixed step (``split_prefill_tiles``): the long queries
    at ``bound``'s tile, the short ones at the smallest row tile, into one output that starts
    as NaN: every row written once, each within ``tol`` of the twin; the long queries' rows
    bit for bit the standard launch's."""
    case = make_paged_case(lens, num_heads, num_kv_heads, head_dim, 16, dtype, device, seed=5)
    args = [case[k] for k in ("q", "k_cache", "v_cache", "block_tables", "query_start_loc",
                              "seq_lens")]  # fmt: skip
    q = case["q"]
    shape = (q.shape[2], q.shape[1], num_kv_heads, q.dtype, q.device)
    per_tile, short = (prefill_tokens_per_tile(*shape, n) for n in (bound, 1))
    query_lens = [n for n, _ in lens]
    contexts = [n for _, n in lens]  # the tiles ordered by the keys they see, as mixed graphs do
    tables = split_prefill_tiles(query_lens, per_tile, short, len(lens) + bound, contexts)
    long_tiles, short_tiles = (torch.from_numpy(t).to(device) for t in tables)
    got = paged_prefill_attention(*args, bound, case["scale"], out=_poisoned_like(q),
                                  tiles=long_tiles)  # fmt: skip
    paged_prefill_attention(*args, short, case["scale"], out=got, tiles=short_tiles)
    assert _rel_err(got, prefill_ref(case, bound)) < tol
    want = paged_prefill_attention(*args, bound, case["scale"], out=_poisoned_like(q))
    ends = np.cumsum([0, *query_lens])
    for n, start, end in zip(query_lens, ends, ends[1:], strict=False):
        if n > short:
            torch.testing.assert_close(got[start:end], want[start:end], rtol=0, atol=0)
    return short


def check_decode(seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, device, tol):
    lens = [(1, s) for s in seq_lens]
    case = make_paged_case(lens, num_heads, num_kv_heads, head_dim, block_size, dtype, device)
    # More counters than needed, the spare ones poisoned: the kernel must touch only its own.
    used = len(seq_lens) * num_kv_heads
    counters = torch.zeros(used + 5, dtype=torch.int32, device=device)
    counters[used:] = 7
    out = paged_decode_attention(
        case["q"],
        case["k_cache"],
        case["v_cache"],
        case["block_tables"],
        case["seq_lens"],
        case["scale"],
        max(seq_lens),
        out=_poisoned_like(case["q"]),
        split_counters=counters,
    )
    ref = decode_ref(case, max(seq_lens))
    assert out.dtype == case["q"].dtype and out.shape == case["q"].shape
    assert torch.isfinite(out).all()
    assert _rel_err(out, ref) < tol
    # The in-kernel merge leaves its arrival counters at zero for the next call.
    assert int(counters[:used].count_nonzero()) == 0 and (counters[used:] == 7).all()
    # Rows started in another order (longest first, or any permutation) are the same rows:
    # each is computed alone, so bit for bit.
    shuffled = np.random.default_rng(len(seq_lens)).permutation(len(seq_lens)).astype(np.int32)
    for order in (longest_first(seq_lens), shuffled):
        ordered = paged_decode_attention(
            case["q"], case["k_cache"], case["v_cache"], case["block_tables"], case["seq_lens"],
            case["scale"], max(seq_lens), out=_poisoned_like(case["q"]), split_counters=counters,
            row_order=torch.from_numpy(order).to(device),
        )  # fmt: skip
        torch.testing.assert_close(ordered, out, rtol=0, atol=0)
    assert int(counters[:used].count_nonzero()) == 0


def check_decode_rope(seq_lens, num_heads, num_kv_heads, head_dim, dtype, device, tol):
    """Rotary + KV store inside the decode kernel against ``rotary_and_store_kv`` followed by
    a plain call, on raw q/k/v that are strided views of one fused projection: the same
    output and the same cache, bit for bit. Slot -1 (a padding row) stores nothing. The twin
    with ``rope`` leaves the same cache and attends within ``tol``."""
    from parallm.kernels.rope_store import rotary_and_store_kv
    from parallm.layers.rotary import RotaryEmbedding

    lens = [(1, s) for s in seq_lens]
    case = make_paged_case(lens, num_heads, num_kv_heads, head_dim, 16, dtype, device, seed=5)
    gen = torch.Generator().manual_seed(11)
    batch, kv = len(seq_lens), num_kv_heads * head_dim
    qkv = torch.randn(batch, num_heads * head_dim + 2 * kv, generator=gen).to(device, dtype)
    q, k, v = qkv.split([num_heads * head_dim, kv, kv], dim=-1)
    q, k, v = (t.view(batch, -1, head_dim) for t in (q, k, v))
    rotary = RotaryEmbedding(head_dim, 8192, 10000.0, None).to(device)
    positions = case["seq_lens"].long() - 1
    pages = case["block_tables"].long().gather(1, (positions // 16)[:, None])[:, 0]
    slots = pages * 16 + positions % 16
    slots[-1] = -1 if len(seq_lens) > 1 else slots[-1]
    caches = [torch.stack([case["k_cache"], case["v_cache"]]) for _ in range(3)]
    q_rot = rotary_and_store_kv(
        q, k, v, rotary.cos_cache, rotary.sin_cache, positions, caches[0], slots
    )
    args = (case["block_tables"], case["seq_lens"], case["scale"], max(seq_lens))
    want = paged_decode_attention(q_rot, caches[0][0], caches[0][1], *args)
    rope = paged_decode.NewTokenRope(k, v, rotary.cos_cache, rotary.sin_cache, positions, slots)
    got = paged_decode_attention(q, caches[1][0], caches[1][1], *args, rope=rope)
    torch.testing.assert_close(caches[1], caches[0], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    ref = paged_decode_attention_ref(q, caches[2][0], caches[2][1], *args, rope=rope)
    torch.testing.assert_close(caches[2], caches[0], rtol=0, atol=0, equal_nan=True)
    assert _rel_err(got, ref.double()) < tol


# Interpreter (CPU) tests: float32, small shapes.


def test_interpreter_suite_in_subprocess():
    """The interpreter tests run: here when triton was imported in interpreter mode, else in a
    subprocess that sets TRITON_INTERPRET before triton's first import."""
    check_interpreter_suite(__file__, INTERPRETING, skip_marker=OLD_INTERPRETER)


# (q_len, seq_len): full prompts, prefix-cache hits, a chunked continuation, decode-like rows,
# lengths on and off block boundaries.
MIXED_LENS = [(1, 1), (5, 5), (17, 17), (3, 40), (20, 37), (1, 33), (16, 32)]


@interpreter_test
@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "block_size"), [(4, 2, 16), (2, 2, 32), (4, 1, 16), (6, 2, 16)]
)
def test_prefill_interpreter(num_heads, num_kv_heads, block_size):
    check_prefill(MIXED_LENS, num_heads, num_kv_heads, 64, block_size, torch.float32, "cpu", 1e-3)


@interpreter_test
def test_prefill_interpreter_multi_tile():
    # Two query tiles in one sequence; prefixes longer than a key tile, one of them ending
    # inside a key tile so that tile must be masked.
    lens = [(200, 200), (40, 200), (30, 150)]
    check_prefill(lens, 2, 1, 32, 16, torch.float32, "cpu", 1e-3)


def test_prefill_tiles_put_the_tiles_that_see_the_most_keys_first():
    table = prefill_tiles([3, 70, 1, 0], tokens_per_tile=32, num_tiles=8)
    assert table.dtype == np.int32
    assert table[0].tolist() == [1, 1, 1, 0, 2, -1, -1, -1]  # sequences (-1: idle tiles)
    assert table[1].tolist() == [2, 1, 0, 0, 0, -1, -1, -1]  # each tile's index in its own
    # With the contexts: cached keys count, so a decode row at 2,000 tokens and a 3-token
    # query after 500 cached go before the 70-token prompt's tiles (70, 64 and 32 keys).
    table = prefill_tiles([3, 70, 1, 0], 32, 8, seq_lens=[503, 70, 2001, 0])
    assert table[0].tolist() == [2, 0, 1, 1, 1, -1, -1, -1]
    assert table[1].tolist() == [0, 0, 2, 1, 0, -1, -1, -1]
    with pytest.raises(ValueError, match="needs 5 query tiles of 32 tokens; the table holds 4"):
        prefill_tiles([3, 70, 1], tokens_per_tile=32, num_tiles=4)


def test_prefill_tiles_must_be_an_int32_pair_of_rows():
    case = make_paged_case([(2, 2)], 2, 1, 16, 16, torch.float32, "cpu")
    args = [case[k] for k in ("q", "k_cache", "v_cache", "block_tables", "query_start_loc",
                              "seq_lens")]  # fmt: skip
    for bad in (torch.zeros(2, 4, dtype=torch.int64), torch.zeros(3, 4, dtype=torch.int32)):
        with pytest.raises(ValueError, match=r"tiles must be a \[2, N\] int32 table"):
            paged_prefill_attention(*args, 2, case["scale"], tiles=bad)


@interpreter_test
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 2), (4, 1)])
def test_prefill_tiles_interpreter(num_heads, num_kv_heads):
    # Mixed: decode rows, a chunk over a cached prefix, a padding sequence with no new token,
    # a prompt longer than one tile; the bound is above every query length (a captured shape).
    lens = [(1, 33), (20, 37), (0, 5), (70, 70), (1, 1)]
    check_prefill_tiles(lens, num_heads, num_kv_heads, 32, torch.float32, "cpu", 1e-3, 128)


def test_split_prefill_tiles_give_short_queries_their_own_table():
    long_tiles, short_tiles = split_prefill_tiles([1, 70, 4, 5, 0], tokens_per_tile=32,
                                                  short_tokens=4, num_tiles=6)  # fmt: skip
    assert long_tiles[0].tolist() == [1, 1, 1, 3, -1, -1]  # more than 4 tokens: 32-token tiles
    assert long_tiles[1].tolist() == [2, 1, 0, 0, -1, -1]
    assert short_tiles[0].tolist() == [2, 0, -1, -1, -1, -1]  # at most 4: one 4-token tile
    assert short_tiles[1].tolist() == [0, 0, -1, -1, -1, -1]
    # With the contexts, the decode row at 900 tokens goes first: its tile sees the most keys.
    _, short_tiles = split_prefill_tiles([1, 70, 4, 5, 0], 32, 4, 6, seq_lens=[900, 70, 4, 5, 0])
    assert short_tiles[0].tolist() == [0, 2, -1, -1, -1, -1]


@interpreter_test
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 2), (4, 1)])
def test_split_tiles_interpreter(num_heads, num_kv_heads):
    # Decode rows, queries at the short cut and one past it, a padding sequence, a prompt
    # longer than one tile; contexts longer than a key tile.
    per_short = 16 // (num_heads // num_kv_heads)  # the smallest row tile's tokens
    lens = [(1, 90), (per_short, 40), (per_short + 1, 77), (0, 5), (70, 70), (1, 1)]
    short = check_split_tiles(lens, num_heads, num_kv_heads, 32, torch.float32, "cpu", 1e-3, 128)
    assert short == per_short


@interpreter_test
def test_prefill_interpreter_odd_head_dim():
    check_prefill([(9, 9), (4, 21)], 2, 1, 40, 16, torch.float32, "cpu", 1e-3)


@interpreter_test
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 2), (8, 2)])
def test_prefill_interpreter_verify_shaped(num_heads, num_kv_heads):
    # Speculative verification: each sequence's last known token and its k drafts (q_len k+1,
    # small tiles) over a cached context, one of them ending exactly on a block boundary.
    lens = [(4, 41), (8, 64), (2, 17), (6, 100), (1, 33)]
    check_prefill(lens, num_heads, num_kv_heads, 64, 16, torch.float32, "cpu", 1e-3)


@interpreter_test
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 2), (2, 2)])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_decode_interpreter(num_heads, num_kv_heads, num_splits, force_splits):
    if num_splits is not None:
        force_splits(num_splits)
    seq_lens = [1, 15, 16, 17, 100, 300]
    check_decode(seq_lens, num_heads, num_kv_heads, 64, 16, torch.float32, "cpu", 1e-3)


@interpreter_test
def test_decode_interpreter_block32_many_splits(force_splits):
    # More splits than some sequences have keys: their extra splits must stay out of the merge.
    force_splits(8)
    check_decode([3, 64, 250], 4, 2, 64, 32, torch.float32, "cpu", 1e-3)


@interpreter_test
def test_decode_matches_prefill_single_token(force_splits):
    # Without split_counters the call allocates its own.
    force_splits(2)
    lens = [(1, 1), (1, 30), (1, 77)]
    case = make_paged_case(lens, 4, 2, 64, 16, torch.float32, "cpu", seed=3)
    args = (case["q"], case["k_cache"], case["v_cache"], case["block_tables"])
    prefill = paged_prefill_attention(
        *args, case["query_start_loc"], case["seq_lens"], 1, case["scale"]
    )
    decode = paged_decode_attention(*args, case["seq_lens"], case["scale"], 77)
    torch.testing.assert_close(prefill, decode, rtol=1e-4, atol=1e-5)


@interpreter_test
@pytest.mark.parametrize("num_splits", [None, 3])
def test_decode_rope_in_kernel_interpreter(num_splits, force_splits):
    if num_splits is not None:
        force_splits(num_splits)
    check_decode_rope([1, 17, 100], 4, 2, 64, torch.float32, "cpu", 1e-3)


@interpreter_test
@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_rope_in_kernel_interpreter_many_tiles(num_splits, force_splits, monkeypatch):
    """32-key tiles: the new token sits in a later tile than the one loaded before the wait."""
    monkeypatch.setattr(paged_decode, "_DECODE_BLOCK_N", 32)
    force_splits(num_splits)
    check_decode_rope([1, 40, 100], 4, 2, 64, torch.float32, "cpu", 1e-3)


def test_decode_split_counters_are_checked(force_splits):
    """Counters of the wrong dtype, device or size are refused before the launch."""
    force_splits(2)
    case = make_paged_case([(1, 300), (1, 280)], 4, 2, 64, 16, torch.float32, "cpu")
    args = (case["q"], case["k_cache"], case["v_cache"], case["block_tables"], case["seq_lens"])
    for bad in (torch.zeros(3, dtype=torch.int32), torch.zeros(8, dtype=torch.int64)):
        with pytest.raises(ValueError, match="split_counters must be int32 on cpu with at least 4"):
            paged_decode_attention(*args, case["scale"], 300, split_counters=bad)


def test_row_orders_are_checked_and_longest_first_sorts_stably():
    case = make_paged_case([(1, 300), (1, 280)], 4, 2, 64, 16, torch.float32, "cpu")
    args = (case["q"], case["k_cache"], case["v_cache"], case["block_tables"], case["seq_lens"])
    for bad in (torch.zeros(3, dtype=torch.int32), torch.zeros(2, dtype=torch.int64)):
        with pytest.raises(ValueError, match=r"row_order must be \[2\] int32"):
            paged_decode_attention(*args, case["scale"], 300, row_order=bad)
    order = longest_first(np.array([5, 900, 1, 900, 40]))
    assert order.dtype == np.int32 and order.tolist() == [1, 3, 4, 0, 2]


def test_new_split_counters_cover_every_split_launch():
    """A split happens only while B * Hkv is under new_split_counters' size."""
    counters = new_split_counters(torch.device("cpu"))
    assert counters.dtype == torch.int32 and not counters.any()
    sms = paged_kv.device_sms(torch.device("cpu"))
    for batch in (1, 2, 3, 7, 16, 33, 64, 128, 256, 512):
        for num_kv_heads in (1, 2, 4, 8):
            if decode_num_splits(batch, num_kv_heads, 1 << 20, sms) > 1:
                assert batch * num_kv_heads <= counters.numel()


def test_decode_rope_rejects_bad_shapes():
    q = torch.zeros(2, 4, 64)
    cache = torch.zeros(3, 16, 2, 64)
    rope = paged_decode.NewTokenRope(
        torch.zeros(2, 3, 64), torch.zeros(2, 2, 64), torch.zeros(9, 64), torch.zeros(9, 64),
        torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"rope.k must be \(2, 2, 64\)"):
        rope.check(q, cache)
    ok = torch.zeros(2, 2, 64)
    positions = torch.zeros(3, dtype=torch.long)
    rope = paged_decode.NewTokenRope(ok, ok, torch.zeros(9, 64), torch.zeros(9, 64),
                                         positions, positions[:2])  # fmt: skip
    with pytest.raises(ValueError, match=r"rope.positions must be \[2\] integer"):
        rope.check(q, cache)
    rope = paged_decode.NewTokenRope(ok, ok, torch.zeros(9, 32), torch.zeros(9, 64),
                                         positions[:2], positions[:2])  # fmt: skip
    with pytest.raises(ValueError, match=r"rope.cos_cache must be \[max_positions, 64\]"):
        rope.check(q, cache)


@interpreter_test
def test_float32_head_dim_128_shrunk_tiles_interpreter(force_splits):
    """float32 at head_dim 128 takes smaller key tiles than bf16 (so they fit shared memory);
    those tiles must compute the same attention."""
    prefill = paged_prefill._prefill_config(128, 40, 2, 4, paged_kv.DEFAULT_SMEM_BYTES)
    decode = paged_decode._decode_config(128, 2, 4, paged_kv.DEFAULT_SMEM_BYTES)
    assert prefill.block_n < 128 and decode.block_n < 128
    check_prefill(MIXED_LENS, 4, 2, 128, 16, torch.float32, "cpu", 1e-3)
    force_splits(2)
    check_decode([1, 17, 100, 300], 4, 2, 128, 16, torch.float32, "cpu", 1e-3)


HOPPER_SMEM, AMPERE_SMEM = 232448, 166912  # opt-in shared memory a block: H100/H200, A100


@pytest.mark.parametrize("smem", [HOPPER_SMEM, AMPERE_SMEM])
@pytest.mark.parametrize("elem_bytes", [2, 4])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_attention_tiles_fit_shared_memory(smem, elem_bytes, head_dim):
    budget = smem - paged_kv.SMEM_RESERVE_BYTES
    block_d = triton.next_power_of_2(head_dim)
    for groups in (1, 2, 4, 8, 16):
        for max_query_len in (1, 16, 4096):
            cfg = paged_prefill._prefill_config(head_dim, max_query_len, groups, elem_bytes, smem)
            used = paged_kv.kv_tiles_bytes(
                cfg.block_m, cfg.block_n, cfg.num_stages, block_d, elem_bytes
            )
            assert used <= budget and cfg.block_n >= 16 and cfg.num_stages >= 1
        cfg = paged_decode._decode_config(head_dim, groups, elem_bytes, smem)
        used = paged_kv.kv_tiles_bytes(
            cfg.block_g, cfg.block_n, cfg.num_stages, block_d, elem_bytes
        )
        assert used <= budget and cfg.block_n >= 16 and cfg.num_stages >= 1


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_half_precision_keeps_tuned_tiles_on_hopper(head_dim):
    """Fitting shared memory leaves the tiles tuned for bf16/fp16 on Hopper as they were."""
    tuned_prefill = {64: (64, 3), 128: (128, 2), 256: (32, 2)}[head_dim]
    tuned_decode = {64: (128, 2), 128: (128, 2), 256: (64, 2)}[head_dim]
    prefill = paged_prefill._prefill_config(head_dim, 4096, 4, 2, HOPPER_SMEM)
    decode = paged_decode._decode_config(head_dim, 4, 2, HOPPER_SMEM)
    assert (prefill.block_n, prefill.num_stages) == tuned_prefill
    assert (decode.block_n, decode.num_stages) == tuned_decode


def test_decode_num_splits_fills_gpu():
    assert decode_num_splits(1, 8, 4096) * 8 >= 128
    assert decode_num_splits(128, 8, 4096) == 1
    assert decode_num_splits(1, 8, 100) == 1
    assert 1 <= decode_num_splits(1, 1, 1 << 20) <= 64


# GPU tests: half precision, realistic shapes.

GPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(32, 8), (32, 4), (8, 8)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_prefill_gpu(dtype, head_dim, num_heads, num_kv_heads, block_size):
    lens = [(512, 512), (1, 2048), (100, 1100), (37, 37), (300, 301), (1, 1)]
    check_prefill(lens, num_heads, num_kv_heads, head_dim, block_size, dtype, "cuda", 1e-2)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(16, 8), (32, 4)])
def test_prefill_tiles_gpu(dtype, head_dim, num_heads, num_kv_heads):
    lens = [(1, 2048), (300, 301), (0, 17), (512, 512), *[(1, 100 + 37 * i) for i in range(40)]]
    check_prefill_tiles(lens, num_heads, num_kv_heads, head_dim, dtype, "cuda", 1e-2, 1024)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(16, 8), (32, 4), (8, 8)])
def test_split_tiles_gpu(dtype, head_dim, num_heads, num_kv_heads):
    short = 16 // (num_heads // num_kv_heads)
    lens = [(1, 2048), (short, 700), (short + 1, 301), (0, 17), (512, 512),
            *[(1, 100 + 37 * i) for i in range(40)]]  # fmt: skip
    check_split_tiles(lens, num_heads, num_kv_heads, head_dim, dtype, "cuda", 1e-2, 1024)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
def test_prefill_gpu_head_dims(dtype, head_dim):
    check_prefill([(200, 200), (50, 333)], 8, 2, head_dim, 16, dtype, "cuda", 1e-2)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("head_dim", [96, 256])
def test_decode_gpu_head_dims(dtype, head_dim):
    check_decode([1000, 3], 8, 2, head_dim, 16, dtype, "cuda", 1e-2)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(32, 8), (32, 4), (8, 8)])
@pytest.mark.parametrize("seq_lens", [[4096], [4100, 1, 17, 2048], [777] * 40])
def test_decode_gpu(dtype, head_dim, num_heads, num_kv_heads, seq_lens):
    check_decode(seq_lens, num_heads, num_kv_heads, head_dim, 16, dtype, "cuda", 1e-2)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("num_splits", [1, 7, 64])
def test_decode_gpu_forced_splits(num_splits, force_splits):
    force_splits(num_splits)
    check_decode([4096, 300, 5000], 32, 8, 128, 32, torch.bfloat16, "cuda", 1e-2)


def _compiled_variants(kernel) -> int:
    """How many variants of ``kernel`` this process has compiled (Triton's in-memory cache)."""
    return sum(len(caches[0]) for caches in kernel.device_caches.values())


@pytest.mark.gpu
@requires_cuda
def test_longest_sequence_compiles_no_new_kernel(force_splits):
    """Steps differ in their longest sequence, and with it in block-table width (2 to 39
    blocks, 16 among them) and decode splits (2 to 16): each kernel compiles once for them
    all, so that serving never stalls on a compile when a longer prompt comes."""
    prefill_lens = [5, 40, 240, 256, 600]  # (5-token queries: one prefill tile size)
    check_prefill([(5, prefill_lens[0])], 8, 2, 64, 16, torch.bfloat16, "cuda", 1e-2)
    compiled = _compiled_variants(paged_prefill._prefill_kernel)
    for seq_len in prefill_lens[1:]:
        check_prefill([(5, seq_len)], 8, 2, 64, 16, torch.bfloat16, "cuda", 1e-2)
    assert _compiled_variants(paged_prefill._prefill_kernel) == compiled
    decode_cases = [(1000, 2), (3000, 5), (4096, 16), (5000, 7), (300, 2)]  # (length, splits)
    for i, (seq_len, splits) in enumerate(decode_cases):
        force_splits(splits)
        check_decode([seq_len], 8, 2, 64, 16, torch.bfloat16, "cuda", 1e-2)
        if i == 0:
            compiled = _compiled_variants(paged_decode._decode_split_kernel)
    assert _compiled_variants(paged_decode._decode_split_kernel) == compiled


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("own_counters", [True, False])
def test_decode_gpu_cuda_graph(own_counters, force_splits):
    """Replays merge 16 splits correctly, with the caller's counters or ones allocated in the
    capture (then zeroed by each replay)."""
    force_splits(16)
    lens = [(1, s) for s in (100, 3000)]
    case = make_paged_case(lens, 32, 8, 64, 16, torch.bfloat16, "cuda")
    args = (case["q"], case["k_cache"], case["v_cache"], case["block_tables"], case["seq_lens"])
    out = torch.empty_like(case["q"])
    counters = new_split_counters(case["q"].device) if own_counters else None
    kw = {"out": out, "split_counters": counters}
    paged_decode_attention(*args, case["scale"], 8192, **kw)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_attention(*args, case["scale"], 8192, **kw)
    for _ in range(2):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert _rel_err(out, decode_ref(case, 8192)) < 1e-2


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(32, 8, 64), (32, 4, 128)])
@pytest.mark.parametrize("seq_lens", [[200], [4100, 1, 17, 2048], [777] * 40])
def test_decode_rope_in_kernel_gpu(dtype, num_heads, num_kv_heads, head_dim, seq_lens):
    check_decode_rope(seq_lens, num_heads, num_kv_heads, head_dim, dtype, "cuda", 1e-2)
