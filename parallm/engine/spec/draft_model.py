"""Drafts from a draft model with its own KV cache: methods ``draft_model`` and ``layer_skip``.

The draft is a smaller checkpoint sharing the target's vocabulary (``draft_model``) or the
target's own first layers (``layer_skip``, :mod:`parallm.engine.spec.layer_skip`). It runs in a
``ModelRunner`` of its own, over a KV cache of its own, managed by a ``KVCacheManager`` of its
own (prefix caching off: a draft block is never shared, so it can always be rolled back).

Every target sequence that drafts has a mirror: a ``Sequence`` of the draft cache holding the
target's tokens followed by the last drafts, and how many of its leading tokens were copied
from the target (those equal the target's, whose tokens are only ever appended). Each
:meth:`DraftModelProposer.propose`:

1. rolls every mirror back to the longest prefix it shares with its sequence (drafts the target
   rejected or never took) and gives it room for the tokens it has not seen and the drafts;
2. feeds the unseen tokens through the draft model, batched over all sequences in chunks of
   at most ``max_num_batched_tokens`` (a whole prompt on a sequence's first draft; after that,
   the token the target emitted past the accepted drafts, or the last draft and the bonus
   token when all were accepted), taking the next token of each as its first draft;
3. runs one batched decode step per further draft, feeding each step the previous step's tokens
   on the device (on CUDA a captured graph that carries them over itself), and reads all the
   drafts back to the host once.

Which next token: for greedy requests, and for every request of ``layer_skip``, the draft's
argmax, which the target keeps while it equals the token it samples itself. For sampled
requests of ``draft_model``, a sample from the draft's own distribution ``q`` under the
request's temperature, top-k, top-p and min-p, drawn from the request's generator; ``q`` goes
with the drafts (``Sequence.draft_probs``) and the target verifies them by speculative
sampling (:mod:`parallm.engine.spec.rejection`). That accepts ``sum_x min(p(x), q(x))`` of a
draft in expectation, against ``p(argmax q)`` for the argmax: much more when ``p`` is flat.
The output then has the target's distribution but is no longer plain decoding's token for
token: a seeded request gives the same tokens again on a fresh engine of the same
configuration running the same requests, but not necessarily beside other requests or after
others filled the prefix cache (which of its steps draft, and how many drafts each verifies,
depend on the batch, and each changes how far its random stream advances).

The target verifies every draft (``DraftVerifier.verify``), so what the draft proposes changes
speed only, never the output's distribution. A sequence whose mirror finds no room in the
draft cache is not drafted that step; the mirrors of sequences that left the running set
(finished, aborted, preempted) are freed by :meth:`release`.

KV cache size: the draft cache has as many blocks as the target's, and both come out of the
one KV budget (``kv_cache_memory`` or ``gpu_memory_utilization``), split in proportion to their
bytes per block (:meth:`target_share`), as vLLM gives draft layers the same number of blocks
from one budget. The draft can then hold every token the target holds, without prefix sharing.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field

import torch

from parallm.config import EngineConfig, ModelConfig
from parallm.engine.kv_cache import KVCacheManager
from parallm.engine.request import Sequence
from parallm.engine.runner import ModelRunner, kv_bytes_per_block
from parallm.engine.scheduler import ScheduledBatch, ScheduledSeq
from parallm.engine.spec.config import SpeculativeConfig
from parallm.engine.spec.layer_skip import LayerSkipModel, check_num_layers
from parallm.engine.spec.rejection import is_sampled, sample_drafts
from parallm.hub import DUMMY_MODEL_PATTERNS, MODEL_PATTERNS, resolve_model_dir
from parallm.models.loader import load_model
from parallm.sampling_params import SamplingParams

MODEL_METHODS = ("draft_model", "layer_skip")

# The mirrors' own parameters: the draft runner proposes its argmax (sampled drafts are drawn
# from its logits by :meth:`DraftModelProposer._next_drafts` under the target request's).
_DRAFT_PARAMS = SamplingParams(temperature=0.0, max_tokens=None)


@dataclass
class _Mirror:
    """The draft cache's copy of one target sequence.

    ``draft.token_ids[:synced]`` were copied from the target sequence (so equal its tokens);
    any after them are the drafts proposed last. ``draft.num_computed_tokens`` of them have
    their KV in the draft cache.
    """

    draft: Sequence
    synced: int = 0


@dataclass
class _Round:
    """One sequence's drafting in one :meth:`DraftModelProposer.propose`."""

    seq: Sequence
    draft: Sequence
    num_drafts: int
    # Drafts sampled from the draft's distribution (else its argmax), whose rows are ``probs``.
    sampled: bool = False
    tokens: list[int] = field(default_factory=list)
    probs: list[torch.Tensor] = field(default_factory=list)


class DraftModelProposer:
    """Owns the draft model, its runner and KV cache, and the mirrors of drafted sequences.

    Built before anything loads (it checks the configuration); :meth:`load` builds the draft
    over the loaded target, :meth:`target_share` and :meth:`allocate_kv_cache` size its cache.
    """

    def __init__(self, spec: SpeculativeConfig, target: ModelConfig, config: EngineConfig) -> None:
        if spec.method not in MODEL_METHODS:
            raise ValueError(f"no draft model for speculative_config.method {spec.method!r}")
        self.spec = spec
        self.target_cfg = target
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.load_format = config.load_format
        self.seed = config.seed
        self.model_dir: str | None = None
        # Sampled requests draft by sampling (see the module's docstring). Not layer_skip:
        # verified by exact match, its argmax is accepted as often as a draft sampled from a
        # point mass would be, and changing it would change that method's seeded output.
        self.samples_drafts = spec.method == "draft_model"
        if spec.method == "layer_skip":
            check_num_layers(spec.num_layers, target)
            self.model_cfg = dataclasses.replace(target, num_hidden_layers=spec.num_layers)
        else:
            self.model_dir = _draft_model_dir(spec.model, config)
            self.model_cfg = _draft_model_config(self.model_dir, target)
        self.target: ModelRunner | None = None
        self.runner: ModelRunner | None = None
        self.kv: KVCacheManager | None = None
        self.max_model_len = 0  # the draft's context: positions it can compute
        self.target_max_model_len = 0
        self.mirrors: dict[int, _Mirror] = {}  # by the target sequence's seq_id

    def load(self, target: ModelRunner, max_model_len: int) -> None:
        """Build the draft model and its runner next to the loaded ``target``."""
        self.target = target
        self.target_max_model_len = max_model_len
        if self.model_dir is None:
            model = LayerSkipModel(target.model, self.spec.num_layers)
            self.max_model_len = max_model_len
        else:
            self.max_model_len = min(max_model_len, _context_limit(self.model_cfg))
            model = load_model(
                self.model_dir, self.model_cfg, target.dtype, target.device,
                max_positions=self.max_model_len + 1, load_format=self.load_format,
                seed=self.seed, packed=True,
            )  # fmt: skip
            if target.fused_kernels:
                from parallm.layers.triton_layers import use_triton_layers  # imports triton

                use_triton_layers(model)
        self.runner = ModelRunner(
            model, self.model_cfg, dataclasses.replace(target.cache_cfg, num_blocks=0),
            target.device, target.dtype, type(target.backend)(),
            fused_kernels=target.fused_kernels,
        )  # fmt: skip

    def target_share(self, num_blocks: int) -> int:
        """How many blocks the target keeps of the ``num_blocks`` its KV budget holds, so that
        the draft cache, with as many blocks, fits the same budget (each cache also has its
        scratch block)."""
        target = self.target
        cache_dtype = target.kv_cache_dtype  # the draft's cache has the target's dtype
        per_target = kv_bytes_per_block(target.model_cfg, target.block_size, cache_dtype)
        per_draft = kv_bytes_per_block(self.model_cfg, target.block_size, cache_dtype)
        return max(0, (num_blocks + 1) * per_target // (per_target + per_draft) - 1)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """The draft's cache of ``num_blocks`` blocks; decode graphs of the target's batch sizes
        when the target captured any."""
        self.runner.allocate_kv_cache(num_blocks)
        self.kv = KVCacheManager(num_blocks, self.runner.block_size, enable_prefix_caching=False)
        if self.target.graphs is not None:
            self.runner.capture_cuda_graphs(self.target.graphs.sizes, self.max_model_len)

    def release(self, running: list[Sequence]) -> None:
        """Free the mirrors of sequences that are no longer running."""
        live = {seq.seq_id for seq in running}
        for seq_id in [i for i in self.mirrors if i not in live]:
            self.kv.free(self.mirrors.pop(seq_id).draft)

    def propose(self, seqs: list[Sequence]) -> None:
        """Set ``draft_token_ids`` of ``seqs`` (draftable sequences) from the draft model."""
        rounds = [r for r in map(self._start_round, seqs) if r is not None]
        if not rounds:
            return
        self._run(rounds)
        for r in rounds:
            r.draft.token_ids.extend(r.tokens)
            r.seq.draft_token_ids = r.tokens
            r.seq.draft_probs = torch.stack(r.probs) if r.sampled else None

    def _num_drafts(self, seq: Sequence) -> int:
        """Drafts that the target could take: within its context and ``max_tokens``, and within
        the draft's context (the last draft fed sits at position ``num_tokens + k - 2``)."""
        n = seq.num_tokens
        num = min(self.spec.num_speculative_tokens, self.target_max_model_len - n - 1,
                  self.max_model_len - n + 1)  # fmt: skip
        return seq.cap_drafts(num)

    def _start_round(self, seq: Sequence) -> _Round | None:
        """Sync the sequence's mirror and give it room for this round, or None (no drafts)."""
        num = self._num_drafts(seq)
        if num <= 0:
            return None
        mirror = self.mirrors.get(seq.seq_id)
        if mirror is None:
            draft = Sequence(f"draft-{seq.seq_id}", 0, [], _DRAFT_PARAMS, seq.arrival_time)
            mirror = self.mirrors[seq.seq_id] = _Mirror(draft)
        draft = mirror.draft
        keep = _common_prefix(mirror, seq)
        self.kv.rollback(draft, draft.num_computed_tokens - keep)
        del draft.token_ids[keep:]
        draft.token_ids.extend(seq.token_ids[keep:])
        mirror.synced = seq.num_tokens
        # The unseen tokens, and every draft but the last (whose KV nothing needs yet).
        if not self.kv.allocate(draft, seq.num_tokens - keep + num - 1):
            return None
        return _Round(seq, draft, num, sampled=self.samples_drafts and is_sampled(seq.params))

    @torch.inference_mode()
    def _run(self, rounds: list[_Round]) -> None:
        """Fill every round's ``tokens`` with its drafts."""
        active, ids = self._catch_up(rounds)
        steps = [(active, ids.clone())]
        for i in range(1, max(r.num_drafts for r in rounds)):
            still = [r for r in active if r.num_drafts > i]
            if len(still) < len(active):
                keep = [j for j, r in enumerate(active) if r.num_drafts > i]
                ids = ids[torch.tensor(keep, device=ids.device)]
            batch = ScheduledBatch(
                [ScheduledSeq(r.draft, r.draft.num_computed_tokens, 1, samples=True) for r in still]
            )
            for r in still:
                r.draft.num_computed_tokens += 1
            # ``ids`` uncloned: a graph recognises its own last output and keeps it in place.
            ids = self._next_drafts(batch, still, ids)
            steps.append((still, ids.clone()))
            active = still
        flat = iter(torch.cat([t for _, t in steps]).tolist())  # the one read back to the host
        for step_rounds, _ in steps:
            for r in step_rounds:
                r.tokens.append(next(flat))

    def _catch_up(self, rounds: list[_Round]) -> tuple[list[_Round], torch.Tensor]:
        """Feed every mirror the target tokens it has not seen, at most
        ``max_num_batched_tokens`` a forward; returns the rounds in the order their first
        draft came out and those drafts, on the device."""
        queue = deque(rounds)
        order: list[_Round] = []
        outputs: list[torch.Tensor] = []
        while queue:
            batch, done, budget = ScheduledBatch(), [], self.max_num_batched_tokens
            while queue and budget > 0:
                draft = queue[0].draft
                start = draft.num_computed_tokens
                take = min(draft.num_tokens - start, budget)
                batch.seqs.append(ScheduledSeq(draft, start, take))  # samples at its last token
                draft.num_computed_tokens += take
                budget -= take
                if draft.num_computed_tokens == draft.num_tokens:
                    done.append(queue.popleft())
            ids = self._next_drafts(batch, done)
            if done:
                order += done
                outputs.append(ids)
        return order, outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _next_drafts(
        self, batch: ScheduledBatch, rounds: list[_Round], device_ids: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Run the draft over ``batch``; the next draft of each of ``rounds`` (its sampling
        sequences, in batch order) on the device, the distribution of each sampled one appended
        to its round's ``probs``. None when no sequence samples."""
        if not any(r.sampled for r in rounds):
            result, _ = self.runner.execute(batch, device_ids)
            return None if result is None else result.token_ids
        logits = self._logits(batch, device_ids).float()
        ids = logits.argmax(dim=-1)
        sampled = [i for i, r in enumerate(rounds) if r.sampled]
        rows = torch.tensor(sampled, device=ids.device)
        requests = [(rounds[i].seq.params, rounds[i].seq.generator) for i in sampled]
        tokens, probs = sample_drafts(logits[rows], requests)
        ids[rows] = tokens
        for i, q in zip(sampled, probs, strict=True):
            rounds[i].probs.append(q)
        return ids

    def _logits(self, batch: ScheduledBatch, device_ids: torch.Tensor | None) -> torch.Tensor:
        """The draft's logits at the batch's sampling rows: from a captured graph for a decode
        batch that has one, else from an eager forward."""
        runner = self.runner
        graphs = runner.graphs
        if graphs is not None and batch.is_pure_decode and len(batch.seqs) <= graphs.max_batch:
            logits, _, _ = graphs.run(*runner.prepare_decode(batch), device_ids=device_ids)
            return logits
        return runner.forward_logits(runner.prepare(batch), device_ids)


def _common_prefix(mirror: _Mirror, seq: Sequence) -> int:
    """How many leading tokens of the mirror's draft cache are still the sequence's, leaving
    at least the sequence's last token to feed (its logits give the first draft)."""
    draft = mirror.draft
    end = min(draft.num_computed_tokens, seq.num_tokens - 1)
    i = min(mirror.synced, end)
    mine, theirs = draft.token_ids, seq.token_ids
    while i < end and mine[i] == theirs[i]:
        i += 1
    return i


def _draft_model_dir(model: str, config: EngineConfig) -> str:
    """The local directory of ``speculative_config.model`` (a directory or a Hub id)."""
    dummy = config.load_format == "dummy"
    return resolve_model_dir(
        model, field="speculative_config.model", download_dir=config.download_dir,
        patterns=DUMMY_MODEL_PATTERNS if dummy else MODEL_PATTERNS,
        required=("config.json",) if dummy else ("config.json", "*.safetensors"),
    )  # fmt: skip


def _draft_model_config(model_dir: str, target: ModelConfig) -> ModelConfig:
    """The draft's config, checked against the target's vocabulary."""
    try:
        cfg = ModelConfig.from_path(model_dir)
    except (ValueError, KeyError) as e:
        raise ValueError(f"speculative_config.model {model_dir!r}: {e}") from None
    if cfg.vocab_size != target.vocab_size:
        raise ValueError(
            f"speculative_config.model {model_dir!r} has a vocabulary of {cfg.vocab_size} "
            f"tokens, the target model {target.vocab_size}: a draft model must share the "
            "target's tokenizer"
        )
    return cfg


def _context_limit(cfg: ModelConfig) -> int:
    """Positions a model computes: its maximum, or a sliding window (not implemented)."""
    limit = cfg.max_position_embeddings
    return min(limit, cfg.sliding_window) if cfg.sliding_window else limit
