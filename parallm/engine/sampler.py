"""Batched token sampling: penalties, bans, temperature, top-k/top-p/min-p, logprobs.

The model runner turns each scheduled sequence into a :class:`SamplingRow`, packs the
batch once with :meth:`SamplingTensors.build`, and calls :class:`Sampler` on the
last-position logits. Every per-row decision is made on the host while building, so the
forward pass is a fixed chain of batched tensor ops with no host sync.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from parallm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from parallm.engine.spec.verify import GreedyChains

# logits / T overflows float32 for tiny T; such a distribution is argmax anyway.
_MIN_TEMPERATURE = 1e-5


@dataclass
class SamplingRow:
    """What the sampler needs to know about one sequence for one step."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None
    # EOS / stop ids while min_tokens is not reached yet.
    banned_token_ids: list[int] = field(default_factory=list)


@dataclass
class SamplingTensors:
    """A batch of :class:`SamplingRow` packed into tensors on the logits' device.

    Optional tensors are ``None`` when no row needs that step, which is how the
    sampler skips it. Token-id tensors are ``[B, L]`` int64 padded with ``vocab_size``.
    """

    vocab_size: int
    temperature: torch.Tensor  # [B] float32, 1.0 on greedy rows
    greedy: torch.Tensor | None  # [B] bool, None when no row is greedy
    all_greedy: bool
    top_k: torch.Tensor | None  # [B] int64, vocab_size where off
    top_p: torch.Tensor | None  # [B] float32, inf where off
    min_p: torch.Tensor | None  # [B] float32
    repetition_penalty: torch.Tensor | None  # [B] float32
    presence_penalty: torch.Tensor | None  # [B] float32
    frequency_penalty: torch.Tensor | None  # [B] float32
    prompt_token_ids: torch.Tensor | None  # [B, Lp], only for repetition_penalty
    output_token_ids: torch.Tensor | None  # [B, Lo], for any penalty
    banned_token_ids: torch.Tensor | None  # [B, Lb]
    generators: list[tuple[int, torch.Generator]]  # (row, generator) of seeded sampled rows
    max_num_logprobs: int | None  # None when no row asked for logprobs

    @property
    def batch_size(self) -> int:
        return self.temperature.shape[0]

    @classmethod
    def build(
        cls, rows: list[SamplingRow], vocab_size: int, device: torch.device
    ) -> SamplingTensors:
        """Pack ``rows`` for logits of width ``vocab_size`` living on ``device``."""
        params = [r.params for r in rows]
        greedy = [_is_greedy(p) for p in params]
        knobs = [_sampling_knobs(p, g, vocab_size) for p, g in zip(params, greedy, strict=True)]

        def tensor(values: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return host_to_device(values, dtype, device)

        def knob(i: int, off: float, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
            """Column ``i`` of ``knobs``, or None when every row has it at ``off``."""
            values = [k[i] for k in knobs]
            return tensor(values, dtype) if any(v != off for v in values) else None

        def penalty(name: str, off: float) -> torch.Tensor | None:
            values = [getattr(p, name) for p in params]
            return tensor(values) if any(v != off for v in values) else None

        def token_ids(lists: list[list[int]], needed: bool) -> torch.Tensor | None:
            return _pad(lists, vocab_size, device) if needed else None

        rep = penalty("repetition_penalty", 1.0)
        presence = penalty("presence_penalty", 0.0)
        frequency = penalty("frequency_penalty", 0.0)
        penalised = rep is not None or presence is not None or frequency is not None
        banned = [r.banned_token_ids for r in rows]
        asked = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            vocab_size=vocab_size,
            temperature=tensor([k[0] for k in knobs]),
            greedy=tensor(greedy, torch.bool) if any(greedy) else None,
            all_greedy=all(greedy),
            top_k=knob(1, vocab_size, torch.int64),
            top_p=knob(2, math.inf),
            min_p=knob(3, 0.0),
            repetition_penalty=rep,
            presence_penalty=presence,
            frequency_penalty=frequency,
            prompt_token_ids=token_ids([r.prompt_token_ids for r in rows], rep is not None),
            output_token_ids=token_ids([r.output_token_ids for r in rows], penalised),
            banned_token_ids=token_ids(banned, any(banned)),
            generators=[
                (i, r.generator)
                for i, (r, g) in enumerate(zip(rows, greedy, strict=True))
                if r.generator is not None and not g
            ],
            max_num_logprobs=max(asked) if asked else None,
        )


@dataclass
class SamplerOutput:
    """Chosen tokens and, when asked, their log-probabilities under the raw logits."""

    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None = None  # [B] float32
    ranks: torch.Tensor | None = None  # [B] int64, 1-based
    top_token_ids: torch.Tensor | None = None  # [B, K] int64
    top_logprobs: torch.Tensor | None = None  # [B, K] float32
    # The token ids already on their way to pinned host memory (written by the step's own
    # kernel, a decode graph's HostRing row): no copy is needed, only the step's event.
    host_token_ids: torch.Tensor | None = None
    # A step that verified draft tokens: per sampling sequence, on the host, every token it
    # emits (its accepted drafts, then one more); ``token_ids`` holds the first of each.
    spec_token_ids: list[list[int]] | None = None
    # With logprobs: the logprobs of the tokens of ``spec_token_ids`` after the first of each
    # sequence, one row per token, sequence by sequence (``token_ids`` are those tokens).
    spec_logprobs: SamplerOutput | None = None
    # When the runner keeps hidden states (a drafter reads them): per sampling sequence, the
    # target's final hidden state at the row its last emitted token was sampled from, [B, H].
    hidden_states: torch.Tensor | None = None
    # A greedy verify step launched without its walk: ``token_ids`` hold every row's argmax,
    # and the step's handle walks these chains when they reach the host (``StepHandle.wait``).
    chains: GreedyChains | None = None

    def select(self, rows: list[int]) -> SamplerOutput:
        """The same output for the given rows only."""
        index = host_to_device(rows, torch.long, self.token_ids.device)
        fields = {f: getattr(self, f) for f in ("token_ids", "logprobs", "ranks",
                                                "top_token_ids", "top_logprobs",
                                                "hidden_states")}  # fmt: skip
        out = SamplerOutput(**{f: None if t is None else t[index] for f, t in fields.items()})
        if self.spec_token_ids is not None:  # a verify step: its emitted runs follow the rows
            out.spec_token_ids = [self.spec_token_ids[i] for i in rows]
            out.spec_logprobs = self._later_rows(rows)
        return out

    def _later_rows(self, rows: list[int]) -> SamplerOutput | None:
        """``spec_logprobs`` of the given rows: the rows of their tokens after the first."""
        emitted = self.spec_token_ids
        starts = list(itertools.accumulate((len(t) - 1 for t in emitted), initial=0))
        later = [starts[i] + j for i in rows for j in range(len(emitted[i]) - 1)]
        return None if self.spec_logprobs is None or not later else self.spec_logprobs.select(later)


class Sampler(torch.nn.Module):
    """Picks one token per row from ``logits[B, V]`` as described by ``SamplingTensors``.

    Order: penalties, bans, then greedy argmax or temperature, top-k, top-p, min-p and
    an exponential race. Logprobs always describe the raw logits passed in.
    """

    def forward(self, logits: torch.Tensor, tensors: SamplingTensors) -> SamplerOutput:
        expected = (tensors.batch_size, tensors.vocab_size)
        if tuple(logits.shape) != expected:
            raise ValueError(f"logits shape {tuple(logits.shape)} does not match {expected}")
        raw = logits.float()
        work = _apply_penalties(raw, tensors)  # out-of-place: raw stays intact for logprobs
        if tensors.banned_token_ids is not None:
            work = _mask_tokens(work, tensors.banned_token_ids)
        token_ids = work.argmax(dim=-1) if tensors.all_greedy else _sample(work, tensors)
        if tensors.max_num_logprobs is None:
            return SamplerOutput(token_ids=token_ids)
        return token_logprobs(raw, token_ids, tensors.max_num_logprobs)


def _is_greedy(p: SamplingParams) -> bool:
    return p.greedy or p.temperature < _MIN_TEMPERATURE


def _sampling_knobs(
    p: SamplingParams, greedy: bool, vocab_size: int
) -> tuple[float, int, float, float]:
    """(temperature, top_k, top_p, min_p) with "off" values that make each step a no-op."""
    if greedy:
        return 1.0, vocab_size, math.inf, 0.0
    top_k = p.top_k if 0 < p.top_k < vocab_size else vocab_size
    # inf, not 1.0: a float cumsum can reach 1.0 before the last token and cut the tail.
    top_p = p.top_p if p.top_p < 1.0 else math.inf
    return p.temperature, top_k, top_p, p.min_p


def host_to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` as a tensor on ``device``, copied without waiting for the GPU. A plain
    ``torch.tensor(values, device=cuda)`` synchronizes the stream (a blocking copy from
    pageable memory): every sampled step would then wait for the step in flight, which async
    scheduling launched for its host work to overlap. Pinned memory stays reserved by
    PyTorch's host allocator until the copy is done."""
    device = torch.device(device)
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


def _pad(seqs: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max((len(s) for s in seqs), default=0)
    padded = [list(s) + [pad] * (width - len(s)) for s in seqs]
    return host_to_device(padded, torch.int64, device).reshape(len(seqs), width)


def _token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[B, V]`` float32 occurrence counts; the padding column ``V`` is dropped."""
    counts = torch.zeros(
        token_ids.shape[0], vocab_size + 1, dtype=torch.float32, device=token_ids.device
    )
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids, dtype=torch.float32))
    return counts[:, :vocab_size]


def _mask_tokens(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(_token_counts(token_ids, logits.shape[1]) > 0, float("-inf"))


def _apply_penalties(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    vocab = logits.shape[1]
    if t.output_token_ids is not None:  # set whenever a penalty is
        output_counts = _token_counts(t.output_token_ids, vocab)
    if t.repetition_penalty is not None:
        seen = (output_counts > 0) | (_token_counts(t.prompt_token_ids, vocab) > 0)
        penalty = t.repetition_penalty.unsqueeze(1)
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalised, logits)
    if t.frequency_penalty is not None:
        logits = logits - t.frequency_penalty.unsqueeze(1) * output_counts
    if t.presence_penalty is not None:
        logits = logits - t.presence_penalty.unsqueeze(1) * (output_counts > 0)
    return logits


def _sample(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    sampled = exponential_race(sampling_probs(logits, t), t.generators)
    return sampled if t.greedy is None else torch.where(t.greedy, logits.argmax(dim=-1), sampled)


def sampling_probs(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """What a sampled row draws from: temperature, top-k, top-p, then min-p over the
    (penalised, banned) ``logits`` [B, V]. Min-p zeroes entries without renormalising, so rows
    sum to at most 1; greedy rows come out as plain softmax (the sampler takes their argmax)."""
    logits = logits / t.temperature.unsqueeze(1)
    if t.top_k is not None or t.top_p is not None:
        logits = _apply_top_k_top_p(logits, t.top_k, t.top_p)
    probs = logits.softmax(dim=-1)
    if t.min_p is not None:
        threshold = probs.amax(dim=-1, keepdim=True) * t.min_p.unsqueeze(1)
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


def _apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Set logits outside each row's top-k / top-p set to -inf (one sort for both)."""
    ordered, order = logits.sort(dim=-1, descending=True)
    if top_k is not None:
        kth = ordered.gather(1, (top_k - 1).unsqueeze(1))
        ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    if top_p is not None:
        probs = ordered.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop = mass_before >= top_p.unsqueeze(1)
        drop[:, 0] = False
        ordered = ordered.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, ordered)


def exponential_race(
    probs: torch.Tensor, generators: list[tuple[int, torch.Generator]]
) -> torch.Tensor:
    """Sample each row of unnormalised ``probs`` as ``argmax(probs / q)``, ``q ~ Exp(1)``."""
    q = torch.empty_like(probs).exponential_()
    for row, gen in generators:
        # A seeded row draws a full row from its own generator, so its tokens do not
        # depend on its position or on the rest of the batch.
        drawn = torch.empty(probs.shape[1], dtype=probs.dtype, device=gen.device)
        q[row] = drawn.exponential_(generator=gen).to(probs.device)
    # q == 0 would turn masked tokens into 0/0 = NaN, which argmax picks.
    q = q.clamp_min_(torch.finfo(q.dtype).tiny)
    return (probs / q).argmax(dim=-1)


def token_logprobs(raw: torch.Tensor, token_ids: torch.Tensor, k: int) -> SamplerOutput:
    """Per row of ``raw`` logits [B, V] (float32): ``token_ids``' logprob and 1-based rank, and
    the top ``k`` (logprobs, ids)."""
    logprobs = raw.log_softmax(dim=-1)
    chosen = token_ids.unsqueeze(1)
    # Rank on raw logits: log_softmax rounding can tie values that differ.
    ranks = (raw > raw.gather(1, chosen)).sum(dim=-1) + 1
    out = SamplerOutput(
        token_ids=token_ids, logprobs=logprobs.gather(1, chosen).squeeze(1), ranks=ranks
    )
    k = min(k, raw.shape[1])
    if k > 0:
        out.top_logprobs, out.top_token_ids = logprobs.topk(k, dim=-1)
    return out


def greedy_argmax(logits: torch.Tensor, fused: bool) -> torch.Tensor:
    """Token ids of the largest logits per row: a Triton kernel when ``fused`` (CUDA, where it
    is several times faster than PyTorch's on a large vocabulary), else ``torch.argmax``."""
    if fused and logits.dim() == 2 and logits.stride(-1) == 1:
        from parallm.kernels.argmax import triton_argmax  # triton only where kernels run

        return triton_argmax(logits)
    return logits.argmax(dim=-1)
