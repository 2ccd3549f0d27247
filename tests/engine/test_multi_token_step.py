"""A step that carries several new tokens per sequence: one known token and k drafts over a
cached context give, at each of the k+1 rows, the logits that k+1 one-token steps give."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from parallm import LLM
from parallm.engine.request import Sequence
from parallm.sampling_params import SamplingParams

# (context length, number of drafts): contexts on and off block boundaries (16), drafts that
# cross into a new block, and a plain decode (no drafts) in the same step.
CASES = [(37, 3), (16, 4), (5, 2), (20, 0), (30, 7)]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama3")), dtype="float32", device="cpu", max_model_len=256,
              enable_prefix_caching=False, kv_cache_memory=8 << 20)  # fmt: skip
    return llm.engine


@pytest.fixture
def tokens(ordinary_token_ids):
    rng = random.Random(7)
    return lambda n: rng.choices(ordinary_token_ids, k=n)


def _start(engine, prompts: list[list[int]], first: list[int]) -> list[Sequence]:
    """Compute the prompts (writing their KV) and append each one's first sampled token."""
    seqs = [Sequence(f"r{i}", 0, p, SamplingParams(), arrival_time=float(i))
            for i, p in enumerate(prompts)]  # fmt: skip
    for seq in seqs:
        engine.scheduler.add(seq)
    _run(engine)
    for seq, token in zip(seqs, first, strict=True):
        seq.append_token(token)
    return seqs


def _run(engine):
    """Schedule and run one step; its inputs and its logits at the sampling rows."""
    batch = engine.scheduler.schedule()
    inputs = engine.runner.prepare(batch)
    with torch.inference_mode():
        logits = engine.runner.forward_logits(inputs)
    return batch, inputs, logits.float()


def _one_token_at_a_time(engine, prompts, first, fed: list[list[int]]) -> list[torch.Tensor]:
    """Per sequence, the logits after each token of ``first + fed``, one token per step."""
    seqs = _start(engine, prompts, first)
    rows: list[list[torch.Tensor]] = [[] for _ in seqs]
    for j in range(max(map(len, fed)) + 1):
        batch, _, logits = _run(engine)
        assert batch.is_pure_decode
        for i, seq in enumerate(seqs):
            rows[i].append(logits[i])
            seq.append_token(fed[i][j] if j < len(fed[i]) else 1)
    _finish(engine, seqs)
    return [torch.stack(r[: len(f) + 1]) for r, f in zip(rows, fed, strict=True)]


def _finish(engine, seqs):
    for seq in seqs:
        engine.scheduler.finish(seq)
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_a_drafted_step_matches_one_token_steps(engine, tokens, monkeypatch):
    prompts = [tokens(n) for n, _ in CASES]
    first = tokens(len(CASES))
    drafts = [tokens(k) for _, k in CASES]
    seqs = _start(engine, prompts, first)
    for seq, d in zip(seqs, drafts, strict=True):
        seq.draft_token_ids = list(d)
    batch, inputs, logits = _run(engine)
    assert [item.draft_token_ids for item in batch.seqs] == drafts
    # The flat inputs: each sequence's last known token, then its drafts, at the next positions.
    lengths = [1 + k for _, k in CASES]
    assert np.diff(inputs.query_start_loc).tolist() == lengths
    assert inputs.input_ids.tolist() == [
        t for f, d in zip(first, drafts, strict=True) for t in [f, *d]
    ]
    expected_positions = [n + j for n, k in CASES for j in range(1 + k)]
    assert inputs.positions.tolist() == expected_positions
    assert inputs.seq_lens.tolist() == [n + 1 + k for n, k in CASES]
    for i, seq in enumerate(seqs):  # every new token gets its own slot in the sequence's blocks
        lo, hi = inputs.query_start_loc[i], inputs.query_start_loc[i + 1]
        pos = inputs.positions[lo:hi]
        table, bs = np.asarray(seq.block_table), engine.kv.block_size
        assert inputs.slot_mapping[lo:hi].tolist() == (table[pos // bs] * bs + pos % bs).tolist()
    # Every row of a drafted sequence is sampled from, in position order.
    assert inputs.sample_indices.tolist() == list(range(sum(lengths)))
    # Never the CUDA graph, which holds one token per sequence.
    monkeypatch.setattr(engine.runner, "graphs", SimpleNamespace(max_batch=64))
    assert not engine.runner._use_graph(batch)
    _finish(engine, seqs)

    reference = _one_token_at_a_time(engine, prompts, first, drafts)
    # float32 defaults (rtol 1.3e-6, atol 1e-5): batched and one-row GEMMs round differently.
    torch.testing.assert_close(logits, torch.cat(reference))


def test_rejected_drafts_roll_back_and_the_next_step_matches(engine, tokens):
    prompts = [tokens(n) for n, _ in CASES]
    first = tokens(len(CASES))
    drafts = [tokens(k) for _, k in CASES]
    accepted = [min(k, a) for (_, k), a in zip(CASES, [1, 0, 2, 0, 3], strict=True)]
    fixes = tokens(len(CASES))  # the token sampled after the accepted drafts
    seqs = _start(engine, prompts, first)
    for seq, d in zip(seqs, drafts, strict=True):
        seq.draft_token_ids = list(d)
    _run(engine)
    for seq, d, a, fix in zip(seqs, drafts, accepted, fixes, strict=True):
        for token in [*d[:a], fix]:
            seq.append_token(token)
        engine.kv.rollback(seq, len(d) - a)
        assert seq.num_computed_tokens == seq.num_tokens - 1
    # The next step rewrites the rejected drafts' slots; their KV must not leak into it.
    seqs[0].draft_token_ids = tokens(2)
    batch, _, logits = _run(engine)
    next_drafts = batch.seqs[0].draft_token_ids
    assert len(next_drafts) == 2
    _finish(engine, seqs)

    fed = [[*d[:a], fix] for d, a, fix in zip(drafts, accepted, fixes, strict=True)]
    fed[0] += next_drafts
    reference = _one_token_at_a_time(engine, prompts, first, fed)
    expected = [reference[0][-3:]] + [r[-1:] for r in reference[1:]]
    torch.testing.assert_close(logits, torch.cat(expected))
