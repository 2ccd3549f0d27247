"""Verifying draft tokens against the target model without changing what it would emit.

Greedy requests keep the drafts up to the first one that differs from the target's argmax
(:func:`greedy_accept`). Sampled requests whose drafts were sampled from a draft model's own
distribution ``q`` (:func:`sample_drafts`) are verified by speculative sampling (Leviathan et
al. 2023; Chen et al. 2023, :func:`rejection_sample`): draft ``x_i`` is accepted with
probability ``min(1, p_i(x_i) / q_i(x_i))``; the first rejected one is replaced by a sample from
``norm(max(0, p_i - q_i))``, and when every draft is accepted a bonus token is drawn from
``p_k``. Either way each emitted token is distributed exactly as plain sampling from ``p``
would emit it, where ``p`` is the distribution the plain sampler draws from
(:func:`target_probs`).
"""

from __future__ import annotations

import torch

from parallm.engine.sampler import (
    SamplingRow,
    SamplingTensors,
    _is_greedy,
    exponential_race,
    sampling_probs,
)
from parallm.sampling_params import SamplingParams


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution plain sampling draws from at each of one request's rows.

    ``logits`` [R, V] (float32) are the target model's rows for one sequence (its last known
    token and its drafts). Temperature, top-k, top-p and min-p are applied by the sampler's
    own code (:func:`parallm.engine.sampler.sampling_probs`) and each row is renormalised
    after min-p. A greedy request (temperature 0 or below the sampler's floor, or top_k 1)
    gets a one-hot row on the argmax: the point mass the sampler emits.

    Out of scope, because the engine does not speculate for such requests: repetition,
    presence and frequency penalties (they would depend on the drafts accepted earlier in
    the same step; refused with ``ValueError``), banned tokens (``min_tokens``), and
    logprobs, which describe the raw logits and are computed from them by the caller.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [rows, vocab], got shape {tuple(logits.shape)}")
    _refuse_penalties(params)
    if not is_sampled(params):
        logits = logits.float()
        one_hot = torch.zeros_like(logits)
        return one_hot.scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
    row = SamplingRow(params, prompt_token_ids=[], output_token_ids=[])
    probs, _ = _sampled_probs(logits, [row] * logits.shape[0])
    return probs


def is_sampled(params: SamplingParams) -> bool:
    """Whether the sampler draws the request's tokens at random rather than taking the argmax
    (temperature 0 or below the sampler's floor, or top_k 1)."""
    return not _is_greedy(params)


def sample_drafts(
    logits: torch.Tensor, requests: list[tuple[SamplingParams, torch.Generator | None]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draft tokens drawn from a draft model's ``logits`` [B, V], row ``i`` as plain sampling
    would draw under request ``i``'s temperature, top-k, top-p and min-p, and the distributions
    ``q`` [B, V] (float32, rows summing to 1) they were drawn from, which
    :func:`rejection_sample` takes as ``draft_probs``. ``requests``: each row's sampling
    parameters (sampled, :func:`is_sampled`, and without penalties) and generator (the
    request's seeded one, or None for the global RNG of the logits' device)."""
    if logits.dim() != 2 or logits.shape[0] != len(requests):
        raise ValueError(
            f"logits must be [len(requests), vocab] = [{len(requests)}, V], "
            f"got shape {tuple(logits.shape)}"
        )
    greedy = [i for i, (params, _) in enumerate(requests) if not is_sampled(params)]
    if greedy:
        raise ValueError(f"sample_drafts samples sampled requests only; rows {greedy} are greedy")
    for params, _ in requests:
        _refuse_penalties(params)
    rows = [SamplingRow(params, [], [], generator) for params, generator in requests]
    probs, tensors = _sampled_probs(logits, rows)
    return exponential_race(probs, tensors.generators), probs


def _sampled_probs(
    logits: torch.Tensor, rows: list[SamplingRow]
) -> tuple[torch.Tensor, SamplingTensors]:
    """The normalised distributions the sampler draws sampled ``rows`` from, and its tensors."""
    tensors = SamplingTensors.build(rows, logits.shape[1], logits.device)
    probs = sampling_probs(logits.float(), tensors)
    return probs / probs.sum(dim=-1, keepdim=True), tensors


def _refuse_penalties(params: SamplingParams) -> None:
    penalties = {
        "repetition_penalty": (params.repetition_penalty, 1.0),
        "presence_penalty": (params.presence_penalty, 0.0),
        "frequency_penalty": (params.frequency_penalty, 0.0),
    }
    used = {name: value for name, (value, off) in penalties.items() if value != off}
    if used:
        raise ValueError(
            f"target_probs does not apply penalties, got {used}; requests with "
            "repetition_penalty != 1, presence_penalty != 0 or frequency_penalty != 0 "
            "are not speculated"
        )


def rejection_sample(
    probs: torch.Tensor,
    draft_token_ids: list[int],
    draft_probs: torch.Tensor | None,
    generator: torch.Generator | None,
) -> list[int]:
    """The tokens one sequence emits this step: its accepted drafts, then one more token.

    ``probs`` [k+1, V]: :func:`target_probs` at the sequence's last known token and its ``k``
    drafts. ``draft_probs`` [k, V]: the distributions the drafts were sampled from, or
    ``None`` for a deterministic drafter (n-gram), whose ``q_i`` is one-hot on ``x_i``.
    Returns 1 to k+1 token ids.

    Randomness comes from ``generator`` (the request's seeded generator; the global RNG of
    ``probs``' device when ``None``) in a fixed order whatever is accepted: ``k`` uniforms,
    then one row of exponentials for the last token, so a seeded request is reproducible.
    """
    k = len(draft_token_ids)
    _check_shapes(probs, draft_token_ids, draft_probs)
    device = probs.device
    drafts = torch.tensor(draft_token_ids, dtype=torch.long, device=device).view(k, 1)
    p_rows = probs[:k]
    if draft_probs is None:
        q_rows = torch.zeros_like(p_rows).scatter_(1, drafts, 1.0)
    else:
        q_rows = draft_probs.to(device=device, dtype=probs.dtype)
    p_draft = p_rows.gather(1, drafts).squeeze(1)
    q_draft = q_rows.gather(1, drafts).squeeze(1)
    # u < p/q written without the division; u < 1, so p >= q > 0 always accepts.
    accepted = _uniforms(k, generator, device) * q_draft < p_draft
    num_accepted = accepted.long().cumprod(dim=0).sum()  # drafts before the first rejection
    residual = (p_rows - q_rows).clamp_min(0.0)
    # p != q at a rejection, so the residual has mass; rounding could still leave none when
    # p and q differ only in the last bits, and then p itself is the right fallback.
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p_rows)
    # Row i < k: the correction after rejecting draft i; row k: the bonus distribution.
    last_rows = torch.cat([residual, probs[k:]])
    last_row = last_rows.index_select(0, num_accepted.view(1))
    seeded = [(0, generator)] if generator is not None else []
    last_token = exponential_race(last_row, seeded)  # unnormalised rows are fine
    n, token = torch.stack([num_accepted, last_token[0]]).tolist()
    return list(draft_token_ids[:n]) + [token]


def _uniforms(k: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    if generator is None:
        return torch.rand(k, device=device)
    return torch.rand(k, generator=generator, device=generator.device).to(device)


def _check_shapes(
    probs: torch.Tensor, draft_token_ids: list[int], draft_probs: torch.Tensor | None
) -> None:
    k = len(draft_token_ids)
    if probs.dim() != 2 or probs.shape[0] != k + 1:
        raise ValueError(
            f"probs must be [k+1, vocab] = [{k + 1}, V] for {k} draft tokens, "
            f"got shape {tuple(probs.shape)}"
        )
    vocab_size = probs.shape[1]
    bad = [t for t in draft_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"draft_token_ids must be in [0, {vocab_size}), got {bad}")
    if draft_probs is not None and tuple(draft_probs.shape) != (k, vocab_size):
        raise ValueError(
            f"draft_probs must be [k, vocab] = [{k}, {vocab_size}] or None, "
            f"got shape {tuple(draft_probs.shape)}"
        )


def greedy_accept(target_ids: list[int], draft_token_ids: list[int]) -> list[int]:
    """What plain greedy decoding emits: the drafts up to the first one that differs from
    the target's argmax ``target_ids`` (k+1 of them), then the target's token there (the
    bonus token when every draft matched)."""
    if len(target_ids) != len(draft_token_ids) + 1:
        raise ValueError(
            f"target_ids must have len(draft_token_ids) + 1 = {len(draft_token_ids) + 1} "
            f"entries, got {len(target_ids)}"
        )
    emitted: list[int] = []
    for target, draft in zip(target_ids, draft_token_ids, strict=False):
        emitted.append(target)
        if target != draft:
            return emitted
    emitted.append(target_ids[-1])
    return emitted
