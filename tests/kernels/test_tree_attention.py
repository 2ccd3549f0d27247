"""Tree attention (the prefill kernel with draft trees): the Triton kernel against its PyTorch
twin on random paged caches and random draft trees, and the twin against attention computed node by node over the context and the
node's own ancestors (what sequential decoding along the node's path attends to).

Without CUDA the kernel runs under the Triton interpreter (see ``triton_interpreter``).
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from triton_interpreter import check_interpreter_suite, kernel_modes  # before triton

triton = pytest.importorskip("triton")

from test_paged_attention import INTERPRETER_WORKS, OLD_INTERPRETER, make_paged_case  # noqa: E402

from parallm.engine.spec.tree import DraftTree  # noqa: E402
from parallm.kernels import paged_prefill  # noqa: E402
from parallm.kernels.reference import paged_prefill_attention_ref  # noqa: E402

INTERPRETING, _, requires_cuda = kernel_modes(paged_prefill._prefill_kernel)
interpreter_test = pytest.mark.skipif(
    not (INTERPRETING and INTERPRETER_WORKS),
    reason=OLD_INTERPRETER
    if INTERPRETING
    else "triton not in interpreter mode here; run by the subprocess test",
)


def _random_tree(rng: random.Random, num_nodes: int) -> DraftTree:
    parents = tuple(rng.randint(-1, i - 1) for i in range(num_nodes))
    return DraftTree(tuple(range(num_nodes)), parents)


def make_tree_case(lens, num_heads, num_kv_heads, head_dim, block_size, dtype, device, seed=0):
    """``make_paged_case`` for ``(q_len, seq_len, num_nodes)``: the last ``num_nodes`` queries
    of a sequence are a random draft tree; returns the case and the trees."""
    case = make_paged_case([(q, s) for q, s, _ in lens], num_heads, num_kv_heads, head_dim,
                           block_size, dtype, device, seed)  # fmt: skip
    rng = random.Random(seed)
    trees = [_random_tree(rng, n) for _, _, n in lens]
    visible = torch.zeros(sum(q for q, _, _ in lens), dtype=torch.int64)
    end = 0
    for (q_len, _, n), tree in zip(lens, trees, strict=True):
        end += q_len
        if n:
            visible[end - n : end] = torch.from_numpy(tree.visible_bits)
    case["tree_num_nodes"] = torch.tensor([n for *_, n in lens], dtype=torch.int32, device=device)
    case["tree_visible"] = visible.to(device)
    return case, trees


def _args(case: dict, max_query_len: int, wide: bool = False) -> tuple:
    cast = (lambda t: t.double()) if wide else (lambda t: t)
    return (cast(case["q"]), cast(case["k_cache"]), cast(case["v_cache"]), case["block_tables"],
            case["query_start_loc"], case["seq_lens"], max_query_len, case["scale"])  # fmt: skip


def _trees(case: dict) -> dict:
    return {"tree_num_nodes": case["tree_num_nodes"], "tree_visible": case["tree_visible"]}


def tree_attention(case: dict, max_query_len: int, **kw) -> torch.Tensor:
    """The kernel on a tree case."""
    return paged_prefill.paged_prefill_attention(*_args(case, max_query_len), **_trees(case), **kw)


def tree_attention_ref(case: dict, max_query_len: int, **kw) -> torch.Tensor:
    """The twin on a tree case, in float64."""
    return paged_prefill_attention_ref(*_args(case, max_query_len, wide=True), **_trees(case), **kw)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def check_kernel(lens, num_heads, num_kv_heads, head_dim, block_size, dtype, device, tol):
    case, _ = make_tree_case(lens, num_heads, num_kv_heads, head_dim, block_size, dtype, device)
    max_q = max(q for q, _, _ in lens)
    out = torch.full_like(case["q"], float("nan"))
    tree_attention(case, max_q, out=out)
    ref = tree_attention_ref(case, max_q)
    assert out.dtype == case["q"].dtype and torch.isfinite(out).all()
    assert _rel_err(out, ref) < tol


# (q_len, seq_len, num_nodes): a known token and its tree over contexts on and off block
# boundaries, a 64-node tree (the sign bit), a prompt chunk and a plain decode row in the
# same step, a sequence that is all tree.
MIXED = [(9, 45, 8), (1, 20, 0), (65, 100, 64), (30, 30, 0), (5, 16, 4), (13, 40, 13), (1, 1, 0)]


def test_the_twin_is_attention_over_context_and_ancestors():
    """Each node's row of the twin equals softmax attention of that node's query over the
    keys sequential decoding along its path holds: the context before the tree, then its
    ancestors and itself."""
    case, trees = make_tree_case(MIXED, 4, 2, 32, 16, torch.float64, "cpu", seed=3)
    out = paged_prefill_attention_ref(*_args(case, 65), **_trees(case))
    k_flat, v_flat = (case[c].view(-1, 2, 32) for c in ("k_cache", "v_cache"))
    starts = case["query_start_loc"].tolist()
    for b, ((q_len, seq_len, n), tree) in enumerate(zip(MIXED, trees, strict=True)):
        pages = case["block_tables"][b].long()
        slot_of = [int(pages[p // 16]) * 16 + p % 16 for p in range(seq_len)]
        tree_start = seq_len - n
        for i in range(q_len):
            pos = seq_len - q_len + i
            if pos < tree_start:
                keys = list(range(pos + 1))
            else:
                node = pos - tree_start
                ancestors = [j for j in range(n) if tree.visible()[node, j]]
                keys = list(range(tree_start)) + [tree_start + j for j in ancestors]
            slots = torch.tensor([slot_of[k] for k in keys])
            k = k_flat[slots].repeat_interleave(2, dim=1)  # [keys, Hq, D]
            v = v_flat[slots].repeat_interleave(2, dim=1)
            query = case["q"][starts[b] + i]  # [Hq, D]
            weights = (torch.einsum("hd,khd->hk", query, k) * case["scale"]).softmax(-1)
            expected = torch.einsum("hk,khd->hd", weights, v)
            torch.testing.assert_close(out[starts[b] + i], expected)


def test_interpreter_suite_in_subprocess():
    """The interpreter tests run: here when triton was imported in interpreter mode, else in a
    subprocess that sets TRITON_INTERPRET before triton's first import."""
    check_interpreter_suite(__file__, INTERPRETING, skip_marker=OLD_INTERPRETER)


@interpreter_test
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "block_size"), [(4, 2, 16), (2, 2, 32)])
def test_tree_kernel_interpreter(num_heads, num_kv_heads, block_size):
    check_kernel(MIXED, num_heads, num_kv_heads, 32, block_size, torch.float32, "cpu", 1e-3)


@interpreter_test
def test_tree_kernel_interpreter_long_prompt_next_to_a_tree():
    # A prompt chunk spanning several query tiles next to a tree: masks in every tile.
    lens = [(200, 260, 0), (17, 90, 16), (40, 40, 40)]
    check_kernel(lens, 2, 1, 64, 16, torch.float32, "cpu", 1e-3)


@interpreter_test
def test_tree_kernel_interpreter_tiles_a_node_sees_nothing_of(monkeypatch):
    # 16-key tiles over sequences that are all tree: some nodes see no key of a whole tile.
    config = paged_prefill._prefill_config
    monkeypatch.setattr(
        paged_prefill,
        "_prefill_config",
        lambda *a: dataclasses.replace(config(*a), block_m=16, block_n=16),
    )
    lens = [(64, 64, 64), (50, 50, 50), (20, 70, 19)]
    check_kernel(lens, 2, 2, 32, 16, torch.float32, "cpu", 1e-3)


@interpreter_test
def test_tree_kernel_interpreter_fp8_cache():
    """An fp8 cache with scales: the kernel widens its tiles and applies k_scale and v_scale
    as the twin dequantizes them."""
    from parallm.kernels.reference import quantize_kv_ref

    case, _ = make_tree_case(MIXED, 4, 2, 32, 16, torch.float32, "cpu", seed=5)
    kv_scale = torch.tensor([0.5, 2.0])
    for name, scale in (("k_cache", kv_scale[0]), ("v_cache", kv_scale[1])):
        case[name] = quantize_kv_ref(case[name], scale)
    out = tree_attention(case, 65, kv_scale=kv_scale)
    ref = paged_prefill_attention_ref(*_args(case, 65), **_trees(case), kv_scale=kv_scale.double())
    assert torch.isfinite(out).all() and _rel_err(out, ref.double()) < 1e-3
    with pytest.raises(ValueError, match="kv_scale"):
        tree_attention(case, 65)


@interpreter_test
def test_triton_backend_takes_the_tree_kernel_for_tree_steps():
    """``TritonAttention`` on a step with trees (rotary at base + depth, store, the prefill
    kernel with the tree mask) gives the reference backend's output and cache."""
    from parallm.layers.attention import AttentionMetadata, ReferenceAttention
    from parallm.layers.backends import TritonAttention
    from parallm.layers.rotary import RotaryEmbedding

    lens = [(9, 45, 8), (1, 20, 0), (5, 16, 4)]
    case, trees = make_tree_case(lens, 4, 2, 32, 16, torch.float32, "cpu", seed=9)
    gen = torch.Generator().manual_seed(2)
    num_tokens = case["q"].shape[0]
    k, v = (torch.randn(num_tokens, 2, 32, generator=gen) for _ in range(2))
    positions, slots = [], []
    for b, ((q_len, seq_len, n), tree) in enumerate(zip(lens, trees, strict=True)):
        layout = range(seq_len - q_len, seq_len)
        pages = case["block_tables"][b].long()
        slots += [int(pages[p // 16]) * 16 + p % 16 for p in layout]
        known = list(layout)[: q_len - n]
        positions += known + [known[-1] + d for d in tree.depths]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots), query_start_loc=case["query_start_loc"],
        seq_lens=case["seq_lens"], block_tables=case["block_tables"],
        max_query_len=max(q for q, _, _ in lens), max_seq_len=max(s for _, s, _ in lens),
        query_start_loc_cpu=case["query_start_loc"].tolist(),
        seq_lens_cpu=case["seq_lens"].tolist(),
        tree_num_nodes=case["tree_num_nodes"], tree_visible=case["tree_visible"],
    )  # fmt: skip
    rope = RotaryEmbedding(32, 256, 10000.0, None).lookup(torch.tensor(positions))
    caches = [torch.stack([case["k_cache"], case["v_cache"]]) for _ in range(2)]
    outs = [
        backend.forward(case["q"].clone(), k, v, cache, meta, case["scale"], rope)
        for backend, cache in zip((ReferenceAttention(), TritonAttention()), caches, strict=True)
    ]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(caches[1], caches[0], equal_nan=True)


def test_bad_tree_inputs_are_refused():
    case, _ = make_tree_case([(3, 10, 2)], 2, 1, 32, 16, torch.float32, "cpu")
    args, nodes = _args(case, 3), case["tree_num_nodes"]
    attend = paged_prefill.paged_prefill_attention
    with pytest.raises(ValueError, match="tree_visible must be int64"):
        attend(*args, tree_num_nodes=nodes, tree_visible=case["tree_visible"].to(torch.int32))
    with pytest.raises(ValueError, match="tree_visible \\[T\\]"):
        attend(*args, tree_num_nodes=nodes, tree_visible=torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="pass both or neither"):
        attend(*args, tree_num_nodes=nodes)


GPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(32, 8), (8, 8)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_tree_kernel_gpu(dtype, head_dim, num_heads, num_kv_heads, block_size):
    lens = [(65, 2100, 64), (1, 700, 0), (300, 301, 0), (26, 1000, 25), (9, 9, 8), (5, 40, 4)]
    check_kernel(lens, num_heads, num_kv_heads, head_dim, block_size, dtype, "cuda", 1e-2)
