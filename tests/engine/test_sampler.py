"""Sampler tests: greedy, seeding, distributions, truncation, penalties, bans, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from parallm.engine.sampler import (
    Sampler,
    SamplerOutput,
    SamplingRow,
    SamplingTensors,
    _apply_penalties,
)
from parallm.sampling_params import SamplingParams

CPU = torch.device("cpu")
N_DRAWS = 20_000
MAX_TV = 0.02


def make_row(
    params: SamplingParams,
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    seed: int | None = None,
    banned: list[int] | None = None,
) -> SamplingRow:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(params, list(prompt or [1]), list(output or []), gen, list(banned or []))


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
    tensors = SamplingTensors.build(rows, logits.shape[1], logits.device)
    return Sampler()(logits, tensors)


def empirical(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).double() / tokens.numel()


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * (p.double() - q.double()).abs().sum().item()


def test_greedy_equals_argmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(16, 50)
    rows = [make_row(SamplingParams(temperature=0.0)) for _ in range(16)]
    assert torch.equal(sample(logits, rows).token_ids, logits.argmax(-1))
    half = logits.to(torch.bfloat16)
    assert torch.equal(sample(half, rows).token_ids, half.float().argmax(-1))


def test_top_k_one_is_greedy_even_at_temperature_one() -> None:
    torch.manual_seed(1)
    logits = torch.randn(64, 30)
    rows = [make_row(SamplingParams(temperature=1.0, top_k=1)) for _ in range(64)]
    assert SamplingTensors.build(rows, 30, CPU).all_greedy
    assert torch.equal(sample(logits, rows).token_ids, logits.argmax(-1))


def test_greedy_rows_inside_a_sampled_batch() -> None:
    torch.manual_seed(2)
    logits = torch.randn(40, 30)
    rows = [
        make_row(SamplingParams(temperature=0.0 if i % 2 else 1.5, top_p=0.8)) for i in range(40)
    ]
    tokens = sample(logits, rows).token_ids
    assert torch.equal(tokens[1::2], logits[1::2].argmax(-1))
    # The sampled rows are really sampled: at T=1.5 some must differ from argmax.
    assert not torch.equal(tokens[0::2], logits[0::2].argmax(-1))


def _run_seeded(
    step_logits: torch.Tensor, position: int, others: list[SamplingParams], seed: int
) -> list[int]:
    """Sample the seeded row over all steps at ``position`` among ``others``."""
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    other_gens = [
        torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in others
    ]
    vocab = step_logits.shape[1]
    tokens: list[int] = []
    for step in range(step_logits.shape[0]):
        torch.rand(7)  # move the default generator between steps
        rows = [SamplingRow(p, [3, 4], [], g, []) for p, g in zip(others, other_gens, strict=True)]
        rows.insert(position, SamplingRow(params, [3, 4], list(tokens), gen, []))
        logits = torch.randn(len(rows), vocab)
        logits[position] = step_logits[step]
        tokens.append(int(sample(logits, rows).token_ids[position]))
    return tokens


def test_same_seed_same_tokens_whatever_the_batch() -> None:
    torch.manual_seed(3)
    step_logits = torch.randn(60, 40) * 0.5  # flat enough that tokens vary a lot
    alone = _run_seeded(step_logits, 0, [], seed=1234)
    crowd = [
        SamplingParams(temperature=0.8, seed=1234),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.3, top_k=5, min_p=0.1, seed=99),
    ]
    assert _run_seeded(step_logits, 3, crowd, seed=1234) == alone
    assert _run_seeded(step_logits, 1, crowd[1:3], seed=1234) == alone
    assert _run_seeded(step_logits, 0, crowd[::-1], seed=1234) == alone
    assert len(set(alone)) > 10
    assert _run_seeded(step_logits, 0, [], seed=4321) != alone


def test_temperature_sampling_matches_softmax() -> None:
    torch.manual_seed(4)
    vocab, temperature = 8, 0.7
    logits = torch.randn(vocab) * 1.5
    rows = [make_row(SamplingParams(temperature=temperature))] * N_DRAWS
    tokens = sample(logits.expand(N_DRAWS, vocab).contiguous(), rows).token_ids
    expected = torch.softmax(logits / temperature, dim=-1)
    assert total_variation(empirical(tokens, vocab), expected) < MAX_TV


def _reference_truncation(probs: list[float], params: SamplingParams) -> list[float]:
    """Plain-Python top-k -> top-p -> min-p on one row of probabilities, renormalised."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    keep = set(order)
    if params.top_k > 0:
        keep = set(order[: params.top_k])
    if params.top_p < 1.0:
        total = sum(probs[i] for i in keep)
        mass, kept = 0.0, set()
        for i in (i for i in order if i in keep):
            kept.add(i)
            mass += probs[i] / total
            if mass >= params.top_p:
                break
        keep = kept
    if params.min_p > 0.0:
        top = max(probs[i] for i in keep)
        keep = {i for i in keep if probs[i] >= params.min_p * top}
    total = sum(probs[i] for i in keep)
    return [probs[i] / total if i in keep else 0.0 for i in range(len(probs))]


TRUNCATIONS = [
    SamplingParams(top_k=3),
    SamplingParams(top_p=0.7),
    SamplingParams(min_p=0.3),
    SamplingParams(top_k=5, top_p=0.6),
    SamplingParams(temperature=0.7, top_p=0.8, min_p=0.2),
    SamplingParams(temperature=1.5, top_k=6, min_p=0.25),
]


@pytest.mark.parametrize("params", TRUNCATIONS, ids=lambda p: f"k{p.top_k}-p{p.top_p}-m{p.min_p}")
def test_truncation_support_and_distribution(params: SamplingParams) -> None:
    torch.manual_seed(5)
    base = torch.tensor([0.3, 0.2, 0.15, 0.12, 0.1, 0.07, 0.04, 0.02])
    perm = torch.randperm(base.numel())
    logits = base[perm].log()
    scaled = torch.softmax(logits / params.temperature, dim=-1).tolist()
    expected = torch.tensor(_reference_truncation(scaled, params))
    rows = [make_row(params)] * N_DRAWS
    tokens = sample(logits.expand(N_DRAWS, -1).contiguous(), rows).token_ids
    seen = empirical(tokens, logits.numel())
    assert (seen[expected == 0] == 0).all(), "sampled outside the allowed set"
    assert total_variation(seen, expected) < MAX_TV


def _reference_penalties(
    logits: list[float], p: SamplingParams, prompt: list[int], output: list[int]
) -> list[float]:
    out = list(logits)
    for tok in set(prompt) | set(output):
        v = out[tok]
        out[tok] = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
    for tok in set(output):
        out[tok] -= p.frequency_penalty * output.count(tok) + p.presence_penalty
    return out


def test_penalties_match_reference() -> None:
    torch.manual_seed(6)
    vocab = 12
    cases = [
        (SamplingParams(repetition_penalty=1.7), [0, 1, 1, 5], [2, 2, 9]),
        (SamplingParams(presence_penalty=0.8), [0, 3], [3, 3, 4, 11]),
        (SamplingParams(frequency_penalty=-0.6), [7], [6, 6, 6, 8]),
        (
            SamplingParams(repetition_penalty=0.6, presence_penalty=-1.1, frequency_penalty=1.3),
            [4, 4, 10, 2, 2, 2],
            [10, 1, 1],
        ),
        (SamplingParams(), [5, 6], [7, 7]),
    ]
    logits = torch.randn(len(cases), vocab) * 2
    rows = [make_row(p, prompt, out) for p, prompt, out in cases]
    tensors = SamplingTensors.build(rows, vocab, CPU)
    got = _apply_penalties(logits.clone(), tensors)
    for i, (p, prompt, out) in enumerate(cases):
        want = torch.tensor(_reference_penalties(logits[i].tolist(), p, prompt, out))
        torch.testing.assert_close(got[i], want)


def test_penalties_steer_greedy_choice() -> None:
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0]] * 3)
    rows = [
        make_row(SamplingParams(temperature=0.0), [0], [0]),
        make_row(SamplingParams(temperature=0.0, repetition_penalty=2.0), [0], []),
        make_row(SamplingParams(temperature=0.0, frequency_penalty=0.6), [2], [0, 0]),
    ]
    assert sample(logits, rows).token_ids.tolist() == [0, 1, 1]


def test_banned_tokens_never_sampled() -> None:
    torch.manual_seed(7)
    vocab, batch = 10, 4000
    logits = torch.randn(batch, vocab)
    logits[:, 3] = 20.0
    logits[:, 7] = 19.0
    rows = [
        make_row(
            SamplingParams(temperature=0.0 if i % 4 == 0 else 1.0), banned=[3, 7] if i % 2 else [3]
        )
        for i in range(batch)
    ]
    tokens = sample(logits, rows).token_ids
    assert not (tokens == 3).any()
    assert not (tokens[1::2] == 7).any()
    # Rows that only ban 3 still pick 7 almost always, so the ban is per row.
    assert (tokens[0::2] == 7).float().mean() > 0.9


def test_logprobs_ranks_and_top_k() -> None:
    torch.manual_seed(8)
    vocab = 20
    params = [
        SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=3.0),
        SamplingParams(temperature=1.0, logprobs=0),
        SamplingParams(temperature=2.0, top_k=10),
        SamplingParams(temperature=0.0, logprobs=5, presence_penalty=2.0),
        SamplingParams(temperature=0.9, top_p=0.9, logprobs=1),
        SamplingParams(temperature=1.0, logprobs=2),
    ]
    logits = torch.randn(len(params), vocab) * 3
    before = logits.clone()
    rows = [
        make_row(p, [int(logits[i].argmax())], [int(logits[i].argmax())])
        for i, p in enumerate(params)
    ]
    out = sample(logits, rows)
    assert torch.equal(logits, before), "sampler must not modify its input"
    raw_lp = torch.log_softmax(logits, dim=-1)
    chosen = out.token_ids
    assert out.logprobs is not None and out.ranks is not None
    torch.testing.assert_close(out.logprobs, raw_lp.gather(1, chosen[:, None]).squeeze(1))
    order = logits.argsort(dim=-1, descending=True)
    want_ranks = [order[i].tolist().index(int(chosen[i])) + 1 for i in range(len(params))]
    assert out.ranks.tolist() == want_ranks
    # Penalties pushed the greedy rows away from the raw argmax, so ranks > 1 are tested.
    assert want_ranks[0] > 1 and want_ranks[3] > 1
    top_lp, top_ids = raw_lp.topk(5, dim=-1)
    assert out.top_token_ids is not None and out.top_logprobs is not None
    assert torch.equal(out.top_token_ids, top_ids)
    torch.testing.assert_close(out.top_logprobs, top_lp)


def test_logprobs_absent_or_zero() -> None:
    logits = torch.randn(2, 6)
    none = sample(logits, [make_row(SamplingParams())] * 2)
    assert none.logprobs is none.ranks is none.top_token_ids is none.top_logprobs is None
    zero = sample(logits, [make_row(SamplingParams(logprobs=0)), make_row(SamplingParams())])
    assert zero.logprobs is not None and zero.top_token_ids is None and zero.top_logprobs is None
    assert math.isclose(
        float(zero.logprobs[0]), float(torch.log_softmax(logits[0], -1)[zero.token_ids[0]])
    )


def test_select_keeps_every_per_row_field():
    """The engine drops the rows of finished sequences with ``select``; every per-row field
    (the hidden states a Medusa drafter reads included) must follow, or it is lost."""
    b, h = 5, 3
    out = SamplerOutput(
        token_ids=torch.arange(b), logprobs=torch.randn(b), ranks=torch.arange(b) + 1,
        top_token_ids=torch.randint(0, 9, (b, 2)), top_logprobs=torch.randn(b, 2),
        hidden_states=torch.randn(b, h),
    )  # fmt: skip
    rows = [4, 1, 2]
    got = out.select(rows)
    for field in ("token_ids", "logprobs", "ranks", "top_token_ids", "top_logprobs",
                  "hidden_states"):  # fmt: skip
        assert torch.equal(getattr(got, field), getattr(out, field)[rows]), field


def test_select_keeps_the_tokens_a_verify_step_emitted():
    """A verify step's output keeps, per selected row, the tokens it emitted and the logprobs
    of those after the first (one row each, sequence by sequence): without them the engine
    would append one token of a verified run and never roll back the rejected drafts."""
    emitted = [[5, 6, 7], [8], [9, 10]]
    later = SamplerOutput(
        token_ids=torch.tensor([6, 7, 10]), logprobs=torch.tensor([-1.0, -2.0, -3.0])
    )
    out = SamplerOutput(token_ids=torch.tensor([5, 8, 9]), logprobs=torch.zeros(3),
                        spec_token_ids=emitted, spec_logprobs=later)  # fmt: skip
    got = out.select([2, 0])
    assert got.spec_token_ids == [[9, 10], [5, 6, 7]]
    assert got.spec_logprobs.token_ids.tolist() == [10, 6, 7]
    assert got.spec_logprobs.logprobs.tolist() == [-3.0, -1.0, -2.0]
    assert out.select([1]).spec_logprobs is None  # no token after the first
    assert (
        SamplerOutput(token_ids=torch.tensor([5, 8, 9]), spec_token_ids=emitted)
        .select([0])
        .spec_logprobs
        is None
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampling_a_step_makes_no_host_sync() -> None:
    """A sampled step's tensors (temperature, top-p, penalties, bans) reach the GPU without a
    stream sync, and so do the sampler and ``select``: with async scheduling the step in
    flight must not be waited for. The tokens equal those of the same rows sampled on the
    CPU's copy of the logits where the draw does not matter (top-k 1)."""
    cuda = torch.device("cuda")
    vocab = 50_000
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, presence_penalty=0.5),
        SamplingParams(temperature=1.0, top_k=1, repetition_penalty=1.2),
        SamplingParams(temperature=0.0),
    ]
    rows = [make_row(p, prompt=[1, 2, 3], output=[4, 5], banned=[7]) for p in params]
    logits = torch.randn(len(rows), vocab, device=cuda)
    sample(logits, rows)  # the pinned host blocks and kernels warm
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sample(logits, rows)
        picked = out.select([2, 1])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = sample(logits.cpu(), rows).token_ids
    assert out.token_ids[1:].tolist() == want[1:].tolist()  # top-k 1 and greedy: no draw
    assert picked.token_ids.tolist() == [want[2].item(), want[1].item()]
