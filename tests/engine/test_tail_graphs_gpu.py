"""The device drafter's tail captured in CUDA graphs (spec/tail_graphs.py): a replay gives the
eager tail's results exactly, from random state, for every captured batch size (rows past the
batch untouched); the capture leaves the state as it found it; and in the engine, with the
graphs on, every device-tail step replays one, the tokens are the eager tail's (both dtypes:
the same kernels on the same rows) and plain decoding's (float32), on the bundled model."""

from __future__ import annotations

import pytest
import torch
from bundled_quality import CODE_PROMPTS, needs_bundled
from test_tail_graphs import assert_same, random_state, restore, results, snapshot
from test_verify_ahead_gpu import SPEC, _tokens, launches_without_sync

from parallm import LLM
from parallm.bundled import BUNDLED_MODEL_DIR
from parallm.engine.verify_graph import _empty_step

pytestmark = pytest.mark.gpu

GRAPH_SIZES = (1, 2, 4)  # batch 3 stages into the shape of 4, past a padding sequence


def _llm(path: str, dtype: str) -> LLM:
    # Async scheduling on: device drafting (and so the tail graphs) needs it.
    return LLM(path, dtype=dtype, device="cuda", kv_cache_memory=64 << 20,
               cuda_graph_sizes=GRAPH_SIZES, speculative_config=SPEC,
               enable_prefix_caching=False, async_scheduling=True)  # fmt: skip


def _assert_as_constructed(runner) -> None:
    """The device state empty and every tail graph's shape buffers all padding."""
    drafts, graphs = runner.device_drafts, runner.verify_graphs
    for name in ("tokens", "lengths", "drafts", "counts", "accepted"):
        assert not getattr(drafts, name).any(), name
    from parallm.kernels.prompt_lookup import lookup_buffer

    assert torch.equal(drafts.latest, lookup_buffer(drafts.max_batch, drafts.max_n, "cuda"))
    padding = _empty_step(False)
    for buffers in {id(b): b for b in drafts.graphs.buffers.values()}.values():
        shape = next(s for s, b in graphs.inputs.items() if b is buffers)
        head, _, _ = graphs._staged(shape, padding)
        assert torch.equal(buffers.region.cpu(), head), shape
        assert (buffers.block_tables == graphs.scratch_block).all(), shape


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_tail_replay_gives_the_eager_tails_results(dtype, tiny_model_dir):
    runner = _llm(str(tiny_model_dir("llama3")), dtype).engine.runner
    tails = runner.device_drafts.graphs
    assert tails is not None and sorted(tails.graphs) == list(range(1, max(GRAPH_SIZES) + 1))
    assert tails.logits is runner.verify_graphs.shared_logits and tails.capture_seconds > 0
    _assert_as_constructed(runner)
    with torch.inference_mode():  # the shared logits are an inference tensor, written here
        outcomes = [_replay_against_eager(runner, b) for b in sorted(tails.graphs)]
    accepted, matched = (sum(column) for column in zip(*outcomes, strict=True))
    assert accepted > 0 and matched > 0  # drafts were taken and lookups found some


def _replay_against_eager(runner, batch: int) -> tuple[int, int]:
    """From random state, the tail of ``batch`` sequences replayed equals it run eagerly, and
    logits that are not the shared buffer's (an eager verify step's) run it eagerly; the
    drafts accepted and the sequences whose lookup matched."""
    drafts, graphs = runner.device_drafts, runner.verify_graphs
    tails = drafts.graphs
    q, block_size = tails.q, runner.block_size
    scratch_slot = graphs.scratch_block * block_size
    buffers, logits = tails.buffers[batch], tails.logits[: batch * q]
    random_state(drafts, buffers, tails.logits, batch, block_size, graphs.scratch_block,
                 seed=batch)  # fmt: skip
    saved = snapshot(drafts, buffers)
    drafts.graphs = None
    want = results(drafts, buffers, *drafts.tail(logits, buffers, batch, block_size,
                                                 scratch_slot))  # fmt: skip
    restore(drafts, buffers, saved)
    drafts.graphs = tails
    replays = tails.num_replays
    argmax, host = drafts.tail(logits, buffers, batch, block_size, scratch_slot)
    assert tails.num_replays == replays + 1 and argmax is tails.argmax[batch]
    assert_same(results(drafts, buffers, argmax, host), want)
    restore(drafts, buffers, saved)
    argmax, host = drafts.tail(logits.clone(), buffers, batch, block_size, scratch_slot)
    assert tails.num_replays == replays + 1
    assert_same(results(drafts, buffers, argmax, host), want)
    return int(want["accepted"][:batch].sum()), int((want["counts"][:batch] > 0).sum())


def _count_tail_launches(monkeypatch, runner) -> list:
    """The batches ``runner`` launches that run the device tail."""
    tailed, launch = [], runner.launch

    def counted(batch, device_ids=None):
        if batch.device_tail:
            tailed.append(batch)
        return launch(batch, device_ids)

    monkeypatch.setattr(runner, "launch", counted)
    return tailed


@needs_bundled
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_tail_graphs_keep_the_tokens_on_the_bundled_model(dtype, monkeypatch):
    path = str(BUNDLED_MODEL_DIR)
    llm = _llm(path, dtype)
    runner = llm.engine.runner
    drafts = runner.device_drafts
    tails = drafts.graphs
    assert tails is not None
    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer(p)["input_ids"] for p in CODE_PROMPTS[:3]]
    batches = [[p] for p in prompts] + [prompts]  # batch 1, then a batch of 3
    tailed = _count_tail_launches(monkeypatch, runner)
    staged = launches_without_sync(monkeypatch, runner, lambda batch: batch.staged_on_device)
    free = llm.engine.kv.num_free_blocks
    replays = tails.num_replays
    got = [_tokens(llm, batch) for batch in batches]
    assert len(staged) > 10 and len(tailed) > len(staged)
    assert tails.num_replays - replays == len(tailed)  # every device tail was one replay
    assert llm.engine._inflight is None and llm.engine.kv.num_free_blocks == free
    drafts.graphs = None  # the same engine, the tail run eagerly
    try:
        assert [_tokens(llm, batch) for batch in batches] == got
    finally:
        drafts.graphs = tails
    if dtype == "float32":  # bfloat16 rounds verify rows and decode rows differently
        plain = LLM(path, dtype=dtype, device="cuda", kv_cache_memory=64 << 20,
                    enable_prefix_caching=False)  # fmt: skip
        assert [_tokens(plain, batch) for batch in batches] == got
