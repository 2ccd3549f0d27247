"""Mixed graphs (engine/mixed_graph.py) on CPU, run without capture: the token counts steps
are bucketed into, and steps that carry prompt tokens run through the static buffers (padding
rows, padding sequences, the tile table) to the eager engine's tokens."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
from arrivals import run_arrivals
from interpreted_engine import run_interpreted

from parallm import LLM, SamplingParams
from parallm.engine.mixed_graph import MAX_MIXED_TOKENS, mixed_token_sizes
from parallm.engine.step_inputs import StepInputs


def test_token_sizes_are_eight_a_doubling_above_64_up_to_the_budget():
    sizes = mixed_token_sizes(16384)
    assert sizes[:12] == [16, 32, 64, 72, 80, 88, 96, 104, 112, 120, 128, 144]
    assert sizes[-3:] == [7168, 7680, MAX_MIXED_TOKENS] and len(sizes) == 3 + 8 * 7
    assert sizes == sorted(set(sizes))
    # Padding above 64 tokens stays under an eighth of the step.
    assert all(b - a <= a / 8 for a, b in zip(sizes[2:], sizes[3:], strict=False))
    assert mixed_token_sizes(1000)[-3:] == [896, 960, 1000]
    assert mixed_token_sizes(100) == [16, 32, 64, 72, 80, 88, 96, 100]
    assert mixed_token_sizes(64, max_tokens=48) == [16, 32, 48]
    assert mixed_token_sizes(8) == []


ENGINE = dict(dtype="float32", device="cpu", max_model_len=256, kv_cache_memory=8 << 20)


@pytest.fixture
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir("llama3")), max_num_seqs=8, **ENGINE)


def _install(llm, sizes, max_num_seqs=8):
    runner = llm.engine.runner
    runner.capture_mixed_graphs(sizes, max_num_seqs, llm.engine.max_model_len, capture=False)
    return runner.mixed_graphs


def _step(query_lens: list[int], width: int = 2, samples: int | None = None) -> StepInputs:
    ends = np.cumsum(query_lens)
    total = int(ends[-1])
    sample = ends - 1 if samples is None else np.arange(samples)
    return StepInputs(
        input_ids=np.zeros(total, np.int64), positions=np.arange(total, dtype=np.int64),
        slot_mapping=np.arange(total, dtype=np.int64),
        query_start_loc=np.concatenate([[0], ends]).astype(np.int32),
        seq_lens=np.array(query_lens, np.int32), block_tables=np.ones((len(query_lens), width),
                                                                     np.int32),
        sample_indices=sample.astype(np.int64),
    )  # fmt: skip


def test_a_step_goes_to_the_smallest_size_that_holds_it(llm):
    graphs = _install(llm, [16, 32, 64])
    assert graphs.size_for(_step([9, 1, 1])) == 16
    assert graphs.size_for(_step([16])) == 16
    assert graphs.size_for(_step([17])) == 32
    assert graphs.size_for(_step([60, 1, 1, 1])) == 64
    assert graphs.size_for(_step([65])) is None  # more tokens than any size
    assert graphs.size_for(_step([1] * 9)) is None  # more sequences than max_num_seqs
    assert graphs.size_for(_step([2] * 5)) == 16
    assert graphs.size_for(_step([4], width=graphs.max_blocks + 1)) is None
    tree = _step([5, 5])
    tree.tree_num_nodes, tree.tree_visible = np.full(2, 4, np.int32), np.ones(10, np.int64)
    assert graphs.size_for(tree) is None  # draft trees stay with the verify graphs
    # A size holds max_seqs(size) sequences and as many sampling rows.
    assert graphs.max_seqs(16) == 8 and _install(llm, [4]).max_seqs(4) == 4
    assert _install(llm, [4]).size_for(_step([1, 1, 2], samples=5)) is None


def test_staging_pads_rows_sequences_and_tiles(llm):
    graphs = _install(llm, [16])
    graphs.tokens_per_tile[16], graphs.short_tokens = 4, 1
    step = _step([6, 1, 2])
    head, tables, (starts, lens) = graphs._staged(16, step)
    layout = graphs.layouts[16]
    rows, per_tile = layout.tokens(head.numpy()), layout.per_seq(head.numpy())
    scratch = graphs.scratch_block * graphs.block_size
    assert rows[2].tolist() == list(range(9)) + [scratch] * 7  # padding rows: the scratch slot
    assert rows[1, 9:].tolist() == [0] * 7 and rows[0, 9:].tolist() == [0] * 7
    assert rows[3, :3].tolist() == [5, 6, 8]  # each sequence's last row samples
    assert starts == [0, 6, 7, 9, 9, 9, 9, 9, 9] and lens == [6, 1, 2, 0, 0, 0, 0, 0]
    # Queries of more than short_tokens in the size's tiles, the others in a table of their own.
    assert per_tile[2, :3].tolist() == [0, 0, 2] and per_tile[3, :3].tolist() == [1, 0, 0]
    assert per_tile[4, :1].tolist() == [1] and per_tile[5, :1].tolist() == [0]
    assert (per_tile[2, 3:] == -1).all() and (per_tile[4, 1:] == -1).all()  # idle tiles
    assert tables.shape == (3, 2)


def test_sizes_share_one_block_table_buffer(llm):
    graphs = _install(llm, [16, 32, 64], max_num_seqs=8)
    tables = [graphs.inputs[t].block_tables for t in graphs.sizes]
    assert {t.data_ptr() for t in tables} == {tables[0].data_ptr()}
    assert [t.shape[0] for t in tables] == [graphs.max_seqs(t) for t in graphs.sizes]
    assert graphs.run(_step([9, 1], width=3), 16) is not None
    assert graphs.inputs[64].block_tables[:2, :3].tolist() == [[1, 1, 1]] * 2


def test_capture_shares_one_pair_of_output_buffers(llm, fake_graph_capture):
    """capture()'s bookkeeping on CPU, the CUDA calls faked: largest size first into a fresh
    pool, the others into its pool, and every graph's outputs views of one pair of buffers
    sized by the largest size's sequences."""
    pools = fake_graph_capture
    graphs = _install(llm, [4, 16, 32])
    graphs.capture()
    assert pools == [None, "pool", "pool"] and set(graphs.graphs) == {4, 16, 32}
    logits_buf = graphs.outputs[32][0]
    assert logits_buf.shape[0] == graphs.max_seqs(32) == 8
    for size in (4, 16, 32):
        logits, rows = graphs.outputs[size]
        assert logits.shape[0] == rows.shape[0] == graphs.max_seqs(size)
        assert logits.data_ptr() == logits_buf.data_ptr()
        assert rows.data_ptr() == graphs.outputs[32][1].data_ptr()


def _generate(llm, prompts, params):
    out = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [[c.token_ids for c in o.outputs] for o in out]


def _prompts() -> list[list[int]]:
    # Lengths that chunk under a 32-token budget, share a prefix (prefix caching) and arrive
    # beside decoding sequences: every step after the first carries prompt tokens and decodes.
    shared = [7 + i for i in range(20)]
    return [shared + [3, 4], [9] * 45, shared + [5], [11, 12, 13], list(range(30, 90))]


@pytest.mark.parametrize("budget", [32, 64])
def test_steps_with_prompt_tokens_through_the_buffers_give_the_eager_tokens(tiny_model_dir, budget):
    engine = dict(
        ENGINE, max_num_seqs=4, max_num_batched_tokens=budget, enable_chunked_prefill=True
    )
    params = [SamplingParams(temperature=0, max_tokens=9, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=3, max_tokens=6, n=2, ignore_eos=True)]  # fmt: skip
    path = str(tiny_model_dir("llama3"))
    plain = LLM(path, **engine)
    want = [_generate(plain, _prompts(), p) for p in params]
    llm = LLM(path, **engine)
    graphs = _install(llm, mixed_token_sizes(budget), max_num_seqs=4)
    assert [_generate(llm, _prompts(), p) for p in params] == want
    assert graphs.num_replays >= 4, graphs.num_replays
    assert llm.engine.kv.num_free_blocks == plain.engine.kv.num_free_blocks  # nothing held


def test_a_step_of_thousands_of_prompt_tokens_goes_through_the_buffers(tiny_model_dir):
    # Nine prompts of 300-460 tokens (3,420 in all) are one step under a 4,096-token budget:
    # a size above the old cap of 2,048, the only step with prompt tokens in it.
    engine = dict(ENGINE, max_model_len=512, kv_cache_memory=32 << 20, max_num_seqs=16,
                  max_num_batched_tokens=4096)  # fmt: skip
    prompts = [[(7 * i + j) % 200 + 3 for j in range(300 + 20 * i)] for i in range(9)]
    assert 2048 < sum(map(len, prompts)) <= 4096
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    path = str(tiny_model_dir("llama3"))
    plain = LLM(path, **engine)
    want = _generate(plain, prompts, params)
    llm = LLM(path, **engine)
    sizes = mixed_token_sizes(4096)
    assert sizes[-1] == 4096 and MAX_MIXED_TOKENS >= 4096
    graphs = _install(llm, sizes, max_num_seqs=16)
    assert _generate(llm, prompts, params) == want
    assert graphs.num_replays == 1  # the prompts' step; the rest are decode steps
    assert llm.engine.kv.num_free_blocks == plain.engine.kv.num_free_blocks


_INTERPRETED = textwrap.dedent(
    """
    import sys
    import triton_interpreter  # before triton: lists its builtins once (speed)
    from parallm import LLM, SamplingParams
    from parallm.engine.mixed_graph import mixed_token_sizes
    from parallm.kernels import paged_prefill
    from parallm.layers.backends import TritonAttention

    tiled = []  # (a tile-table launch, its max_query_len) of every prefill launch
    prefill = paged_prefill.paged_prefill_attention
    def counted(*args, **kwargs):
        tiled.append((kwargs.get("tiles") is not None, args[6]))
        return prefill(*args, **kwargs)
    paged_prefill.paged_prefill_attention = counted

    prompts = [[5 + i for i in range(n)] for n in (3, 21, 9)]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    engine = dict(device="cpu", max_model_len=128, max_num_seqs=4, max_num_batched_tokens=16)
    def run(llm):
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]
    want = run(LLM(sys.argv[1], **engine))
    llm = LLM(sys.argv[1], **engine)
    runner = llm.engine.runner
    runner.backend = TritonAttention()  # what CUDA gets; the interpreter runs its kernels
    runner.capture_mixed_graphs(mixed_token_sizes(16), 4, llm.engine.max_model_len,
                                capture=False)
    assert run(llm) == want, (run(llm), want)
    short = runner.mixed_graphs.short_tokens
    assert runner.mixed_graphs.num_replays >= 2 and (True, 16) in tiled, tiled
    assert (True, short) in tiled and short < 16, (short, tiled)  # the decode rows' launch
    print("mixed ok", runner.mixed_graphs.num_replays)
    """
)


def test_the_buffers_run_the_triton_kernels_to_the_eager_tokens(tiny_model_dir):
    """Under the Triton interpreter: the tile-table launches (the short queries' of their
    own), padding rows storing into the scratch block and padding sequences, through the
    engine to the eager engine's tokens."""
    out = run_interpreted(_INTERPRETED, str(tiny_model_dir("llama3")), timeout=600)
    assert "mixed ok" in out


def test_a_step_launched_ahead_admits_prompts_through_the_buffers(tiny_model_dir):
    """Prompts arriving mid-decode join the step launched ahead, which replays a mixed graph:
    the decode rows' ids come from the device into the buffers (``known``), over the host's
    placeholders. The tokens are the synchronous eager engine's, and every step but the
    first runs ahead."""
    engine = dict(ENGINE, max_num_seqs=4, max_num_batched_tokens=64)
    path = str(tiny_model_dir("llama3"))
    prompts = _prompts()
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=7, max_tokens=8, ignore_eos=True)] * 2  # fmt: skip
    queue, at = [prompts[0], prompts[3], prompts[1], prompts[2]], [0, 2, 3, 5]
    want, _, _ = run_arrivals(LLM(path, async_scheduling=False, **engine), queue, params, at)
    llm = LLM(path, async_scheduling=True, **engine)
    graphs = _install(llm, mixed_token_sizes(64), max_num_seqs=4)
    got, steps, ahead = run_arrivals(llm, queue, params, at)
    assert got == want
    assert graphs.num_replays >= 4 and ahead == steps - 1, (graphs.num_replays, ahead, steps)
