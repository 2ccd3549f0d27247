"""Verification of draft tokens: speculative sampling is lossless, greedy acceptance is exact,
and target_probs is the distribution the plain sampler draws from.

The lossless tests decode with a tiny "model" whose target distribution at position j is a
fixed p_j, whatever the prefix. Plain sampling then emits independent tokens, position j
drawn from p_j, so speculative decoding must too: Pearson's chi-square test compares the
emitted tokens' counts with p_j per position and with p_0 x p_1 jointly for the first two.
The same check run on two deliberately wrong verifiers must fail.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from parallm.engine.sampler import Sampler, SamplingRow, SamplingTensors
from parallm.engine.spec.rejection import (
    greedy_accept,
    is_sampled,
    rejection_sample,
    sample_drafts,
    target_probs,
)
from parallm.sampling_params import SamplingParams

VOCAB = 6
K = 3  # drafts per step
POSITIONS = 3  # emitted positions whose distribution is checked
N_RUNS = 10_000  # decodes of POSITIONS tokens per scenario
# Significance of each chi-square test. The tests are seeded, so this is the chance that a
# correct verifier would have been flagged by an unlucky choice of seed.
ALPHA = 1e-4

Verifier = Callable[[torch.Tensor, list[int], torch.Tensor | None, torch.Generator], list[int]]


def fixed_model(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Target rows p [P, V] and draft rows q [P, V], one per position: q is a noisy p, close
    enough that whole runs of drafts are accepted and far enough that many are rejected.

    Token 0 has probability 0 under p_1 (as if cut by top-k): it must never be emitted there.
    """
    gen = torch.Generator().manual_seed(seed)
    rows = POSITIONS + K
    logits = torch.randn(rows, VOCAB, generator=gen)
    p = torch.softmax(logits, dim=-1)
    p[1, 0] = 0.0
    p = p / p.sum(dim=-1, keepdim=True)
    q = torch.softmax(logits + torch.randn(rows, VOCAB, generator=gen), dim=-1)
    return p, q


def one_hot_draft(context: list[int], p: torch.Tensor) -> int:
    """A deterministic drafter whose guess depends on the whole context, as n-gram's does:
    the target's most likely token after most contexts, another one after the rest."""
    mode = int(p[len(context)].argmax())
    return mode if sum(context) % 4 else (mode + 1 + len(context)) % VOCAB


def decode(
    verify: Verifier, p: torch.Tensor, q: torch.Tensor | None, seed: int
) -> tuple[torch.Tensor, list[int]]:
    """N_RUNS speculative decodes of POSITIONS tokens: tokens [N_RUNS, POSITIONS] and how
    many steps accepted 0..K drafts. ``q=None`` drafts with :func:`one_hot_draft`."""
    verify_gen = torch.Generator().manual_seed(seed)
    draft_gen = torch.Generator().manual_seed(seed + 1)
    runs, steps_by_accepted = [], [0] * (K + 1)
    for _ in range(N_RUNS):
        tokens: list[int] = []
        while len(tokens) < POSITIONS:
            pos = len(tokens)
            if q is None:
                drafts: list[int] = []
                for _ in range(K):
                    drafts.append(one_hot_draft(tokens + drafts, p))
                draft_probs = None
            else:
                draft_probs = q[pos : pos + K]
                drafts = torch.multinomial(draft_probs, 1, generator=draft_gen).view(-1).tolist()
            emitted = verify(p[pos : pos + K + 1], drafts, draft_probs, verify_gen)
            steps_by_accepted[len(emitted) - 1] += 1
            tokens += emitted
        runs.append(tokens[:POSITIONS])
    return torch.tensor(runs), steps_by_accepted


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P-value of Pearson's chi-square test that ``counts`` were drawn from ``probs``; 0 when
    a token of probability 0 occurs."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    possible = probs > 0
    if counts[~possible].sum() > 0:
        return 0.0
    expected = counts.sum() * probs[possible] / probs[possible].sum()
    # The chi-square approximation needs about 5 expected draws in every cell.
    assert expected.min() >= 5, f"too few draws for a chi-square test: {expected.min():.1f}"
    statistic = ((counts[possible] - expected) ** 2 / expected).sum()
    dof = torch.tensor(possible.sum().item() - 1, dtype=torch.float64)
    return torch.special.gammaincc(dof / 2, statistic / 2).item()  # chi2 survival function


def p_values(tokens: torch.Tensor, p: torch.Tensor) -> dict[str, float]:
    """Each checked position against its p_j, and the first two jointly against p_0 x p_1."""
    out = {
        f"position {j}": chi_square_p_value(torch.bincount(tokens[:, j], minlength=VOCAB), p[j])
        for j in range(POSITIONS)
    }
    pairs = torch.bincount(tokens[:, 0] * VOCAB + tokens[:, 1], minlength=VOCAB * VOCAB)
    out["positions 0, 1 jointly"] = chi_square_p_value(pairs, torch.outer(p[0], p[1]))
    return out


def accept_every_draft(
    probs: torch.Tensor, drafts: list[int], draft_probs: torch.Tensor | None, gen: torch.Generator
) -> list[int]:
    """Wrong: keeps every draft, then a bonus token from p_k."""
    return drafts + torch.multinomial(probs[len(drafts)], 1, generator=gen).tolist()


def correct_from_target(
    probs: torch.Tensor, drafts: list[int], draft_probs: torch.Tensor | None, gen: torch.Generator
) -> list[int]:
    """Wrong: accepts like speculative sampling but draws the correction from p_i instead of
    norm(max(0, p_i - q_i))."""
    for i, draft in enumerate(drafts):
        q = 1.0 if draft_probs is None else draft_probs[i, draft].item()
        if torch.rand(1, generator=gen).item() * q >= probs[i, draft].item():
            return drafts[:i] + torch.multinomial(probs[i], 1, generator=gen).tolist()
    return drafts + torch.multinomial(probs[len(drafts)], 1, generator=gen).tolist()


@pytest.mark.parametrize("drafter", ["sampled", "one_hot"])
def test_emitted_tokens_are_distributed_as_the_target(drafter: str) -> None:
    p, q = fixed_model(seed=11)
    tokens, steps_by_accepted = decode(
        rejection_sample, p, q if drafter == "sampled" else None, seed=5
    )
    # Every path is exercised often: rejection at each draft, and the bonus token.
    assert min(steps_by_accepted) > N_RUNS // 20, steps_by_accepted
    assert (tokens[:, 1] != 0).all()  # probability 0 under p_1
    failed = {name: pv for name, pv in p_values(tokens, p).items() if pv < ALPHA}
    assert not failed, f"emitted tokens are not distributed as the target: {failed}"


@pytest.mark.parametrize("wrong", [accept_every_draft, correct_from_target])
@pytest.mark.parametrize("drafter", ["sampled", "one_hot"])
def test_the_distribution_check_fails_for_a_wrong_verifier(drafter: str, wrong: Verifier) -> None:
    p, q = fixed_model(seed=11)
    tokens, _ = decode(wrong, p, q if drafter == "sampled" else None, seed=5)
    assert min(p_values(tokens, p).values()) < ALPHA


def test_chi_square_p_value_matches_known_quantiles() -> None:
    # chi2(df=5) exceeds 25.7448 with probability 1e-4; chi2(df=1) exceeds 3.8415 with 0.05.
    uniform = torch.full((6,), 1 / 6)
    counts = torch.tensor([100.0] * 6)
    assert chi_square_p_value(counts, uniform) == pytest.approx(1.0)
    statistic_df5 = torch.special.gammaincc(torch.tensor(2.5, dtype=torch.float64),
                                            torch.tensor(25.7448 / 2, dtype=torch.float64))  # fmt: skip
    assert statistic_df5.item() == pytest.approx(1e-4, rel=1e-3)
    # 60 vs 40 of 100 under a fair coin: statistic 4, p = 0.0455.
    fair = torch.tensor([0.5, 0.5])
    assert chi_square_p_value(torch.tensor([60, 40]), fair) == pytest.approx(0.0455, abs=1e-4)
    assert chi_square_p_value(torch.tensor([5, 1]), torch.tensor([1.0, 0.0])) == 0.0


def test_draft_distribution_equal_to_target_accepts_every_draft() -> None:
    p, _ = fixed_model(seed=3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        drafts = torch.multinomial(p[:K], 1, generator=gen).view(-1).tolist()
        emitted = rejection_sample(p[: K + 1], drafts, p[:K].clone(), gen)
        assert emitted[:K] == drafts and len(emitted) == K + 1


def test_draft_of_probability_zero_is_always_rejected_and_never_emitted() -> None:
    probs = torch.tensor([[0.0, 0.5, 0.5], [0.2, 0.3, 0.5]])
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        emitted = rejection_sample(probs, [0], None, gen)
        assert len(emitted) == 1 and emitted[0] in (1, 2)


def flat_model(seed: int) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    p = torch.softmax(0.3 * torch.randn(K + 1, 50, generator=gen), dim=-1)
    q = torch.softmax(0.3 * torch.randn(K, 50, generator=gen), dim=-1)
    drafts = [torch.multinomial(q, 1, generator=gen).view(-1).tolist() for _ in range(100)]
    return p, q, drafts


def run_seeded(seed: int, draft_probs: bool) -> list[list[int]]:
    p, q, drafts = flat_model(seed=0)
    gen = torch.Generator().manual_seed(seed)
    return [rejection_sample(p, d, q if draft_probs else None, gen) for d in drafts]


@pytest.mark.parametrize("draft_probs", [True, False])
def test_same_seed_same_tokens_and_different_seeds_differ(draft_probs: bool) -> None:
    first = run_seeded(1234, draft_probs)
    torch.rand(17)  # the global RNG must not matter to a seeded request
    assert run_seeded(1234, draft_probs) == first
    assert run_seeded(4321, draft_probs) != first
    assert len({len(out) for out in first}) > 1  # outcomes vary, so equality means something


def test_unseeded_calls_follow_the_global_rng() -> None:
    p, q, drafts = flat_model(seed=0)
    outputs = []
    for _ in range(2):
        torch.manual_seed(99)
        outputs.append([rejection_sample(p, d, q, None) for d in drafts])
    assert outputs[0] == outputs[1]


def test_generator_advances_the_same_whatever_is_accepted() -> None:
    # A seeded request's later steps must not depend on how many drafts an earlier one kept.
    probs = torch.tensor([[0.0, 0.5, 0.5]] * 3 + [[0.2, 0.3, 0.5]])
    states = []
    for drafts in ([0, 0, 0], [1, 2, 1]):  # always rejected at once / maybe all accepted
        gen = torch.Generator().manual_seed(7)
        rejection_sample(probs, drafts, None, gen)
        states.append(gen.get_state())
    assert torch.equal(states[0], states[1])


def test_rejection_sample_names_bad_shapes() -> None:
    probs = torch.full((3, 4), 0.25)
    with pytest.raises(ValueError, match="probs must be"):
        rejection_sample(probs, [1], None, None)
    with pytest.raises(ValueError, match="draft_token_ids must be in"):
        rejection_sample(probs, [1, 4], None, None)
    with pytest.raises(ValueError, match="draft_probs must be"):
        rejection_sample(probs, [1, 2], torch.full((2, 5), 0.2), None)


@pytest.mark.parametrize(
    ("targets", "drafts", "emitted"),
    [
        ([5, 6, 7, 8], [5, 6, 7], [5, 6, 7, 8]),  # every draft matches: all plus the bonus
        ([5, 6, 7, 8], [5, 9, 7], [5, 6]),  # first mismatch at 1: the target's token there
        ([5, 6, 7, 8], [1, 6, 7], [5]),  # mismatch at once
        ([5, 6, 7, 8], [5, 6, 1], [5, 6, 7]),  # mismatch at the last draft
        ([4], [], [4]),  # no drafts: plain decoding
    ],
)
def test_greedy_accept(targets: list[int], drafts: list[int], emitted: list[int]) -> None:
    assert greedy_accept(targets, drafts) == emitted


def test_greedy_accept_needs_one_more_target_than_drafts() -> None:
    with pytest.raises(ValueError, match="target_ids must have"):
        greedy_accept([1, 2], [1, 2])


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=0.0), SamplingParams(top_k=1), SamplingParams(temperature=1e-7)],
)
def test_greedy_requests_verify_as_greedy_accept(params: SamplingParams) -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        logits = torch.randn(K + 1, 10, generator=gen)
        argmax = logits.argmax(dim=-1).tolist()
        # Each draft is the argmax or not with even odds, so every acceptance length occurs.
        drafts = [a if torch.rand(1, generator=gen) < 0.5 else (a + 1) % 10 for a in argmax[:K]]
        probs = target_probs(logits, params)
        assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), 10).float())
        assert rejection_sample(probs, drafts, None, gen) == greedy_accept(argmax, drafts)


def direct_probs(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float
) -> torch.Tensor:
    """The sampler's documented steps written out per row: temperature, keep the top_k
    largest, keep the shortest prefix (by descending probability) whose mass before each
    kept token is below top_p, softmax, drop tokens below min_p x the largest, renormalise."""
    out = torch.zeros_like(logits)
    for r, row in enumerate(logits / temperature):
        order = row.argsort(descending=True).tolist()
        kept = order[: top_k if top_k > 0 else len(order)]
        if top_p < 1.0:
            probs = torch.softmax(row[kept], dim=-1).tolist()
            mass, cut = 0.0, []
            for token, prob in zip(kept, probs, strict=True):
                if cut and mass >= top_p:
                    break
                cut.append(token)
                mass += prob
            kept = cut
        probs = torch.softmax(row[kept], dim=-1)
        keep = probs >= probs.max() * min_p
        kept_tokens = torch.tensor(kept)[keep]
        out[r, kept_tokens] = probs[keep] / probs[keep].sum()
    return out


SAMPLED_PARAMS = [
    dict(temperature=1.0),
    dict(temperature=0.6),
    dict(temperature=1.3, top_k=5),
    dict(temperature=0.8, top_p=0.7),
    dict(temperature=1.0, min_p=0.2),
    dict(temperature=0.7, top_k=12, top_p=0.9, min_p=0.05),
]


@pytest.mark.parametrize("knobs", SAMPLED_PARAMS)
def test_target_probs_is_the_sampler_distribution_written_out(knobs: dict) -> None:
    gen = torch.Generator().manual_seed(1)
    logits = 2.0 * torch.randn(K + 1, 32, generator=gen)
    probs = target_probs(logits, SamplingParams(**knobs))
    expected = direct_probs(logits, knobs["temperature"], knobs.get("top_k", 0),
                            knobs.get("top_p", 1.0), knobs.get("min_p", 0.0))  # fmt: skip
    assert torch.equal(probs == 0, expected == 0)  # the same tokens cut, exactly zero
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(K + 1))
    if len(knobs) > 1:
        assert (probs == 0).any()  # the knobs really cut something


@pytest.mark.parametrize("knobs", SAMPLED_PARAMS[2:])
def test_sampler_draws_from_target_probs(knobs: dict) -> None:
    draws, vocab = 20_000, 16
    logits = 2.0 * torch.randn(1, vocab, generator=torch.Generator().manual_seed(2))
    params = SamplingParams(**knobs)
    probs = target_probs(logits, params)[0].double()
    rows = [SamplingRow(params, [1], [])] * draws
    tensors = SamplingTensors.build(rows, vocab, logits.device)
    torch.manual_seed(3)
    tokens = Sampler()(logits.expand(draws, vocab).contiguous(), tensors).token_ids
    assert chi_square_p_value(torch.bincount(tokens, minlength=vocab), probs) > ALPHA


@pytest.mark.parametrize(
    "penalty",
    [dict(repetition_penalty=1.2), dict(presence_penalty=0.5), dict(frequency_penalty=-0.3)],
)
def test_target_probs_refuses_penalties(penalty: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(penalty))):
        target_probs(torch.randn(2, 8), SamplingParams(**penalty))


def test_sample_drafts_draws_each_row_from_its_requests_distribution() -> None:
    """Row i is drawn from target_probs under request i's parameters, and q is that
    distribution: two requests with other knobs side by side, thousands of draws each."""
    draws, vocab = 8000, 12
    logits = 2.0 * torch.randn(2, vocab, generator=torch.Generator().manual_seed(4))
    knobs = [SamplingParams(temperature=0.7, top_k=6), SamplingParams(temperature=1.3, top_p=0.8)]
    expected = torch.cat([target_probs(logits[i : i + 1], p) for i, p in enumerate(knobs)])
    torch.manual_seed(5)
    counts = torch.zeros(2, vocab, dtype=torch.long)
    for _ in range(draws // 100):
        batch = logits.repeat(100, 1)
        tokens, q = sample_drafts(batch, [(knobs[0], None), (knobs[1], None)] * 100)
        torch.testing.assert_close(q, expected.repeat(100, 1))
        counts += torch.nn.functional.one_hot(tokens.view(100, 2), vocab).sum(dim=0)
    for row in range(2):
        assert chi_square_p_value(counts[row], expected[row]) > ALPHA


def test_sample_drafts_follows_each_rows_generator() -> None:
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(6))
    params = SamplingParams(temperature=1.0)

    def draw(seed: int) -> list[int]:
        gens = [torch.Generator().manual_seed(seed + i) for i in range(3)]
        return [sample_drafts(logits, list(zip([params] * 3, gens, strict=True)))[0].tolist()
                for _ in range(20)]  # fmt: skip

    first = draw(1)
    torch.rand(9)  # the global RNG must not matter to seeded rows
    assert draw(1) == first
    assert draw(2) != first


def test_sample_drafts_refuses_greedy_rows_penalties_and_bad_shapes() -> None:
    logits = torch.randn(2, 8)
    sampled = (SamplingParams(temperature=1.0), None)
    with pytest.raises(ValueError, match=r"rows \[1\] are greedy"):
        sample_drafts(logits, [sampled, (SamplingParams(temperature=0.0), None)])
    with pytest.raises(ValueError, match="presence_penalty"):
        sample_drafts(logits, [sampled, (SamplingParams(presence_penalty=0.5), None)])
    with pytest.raises(ValueError, match="logits must be"):
        sample_drafts(logits, [sampled])


@pytest.mark.parametrize(
    ("knobs", "sampled"),
    [
        (dict(temperature=0.0), False),
        (dict(temperature=1e-7), False),  # below the sampler's floor: its argmax
        (dict(temperature=0.8, top_k=1), False),
        (dict(temperature=0.8), True),
        (dict(temperature=0.8, top_p=0.5), True),
    ],
)
def test_is_sampled_is_the_samplers_choice(knobs: dict, sampled: bool) -> None:
    assert is_sampled(SamplingParams(**knobs)) is sampled
