"""The model runner: turns a ScheduledBatch into tensors, runs the model and samples.

It owns the KV cache tensors and the attention backend. It decides nothing: the
scheduler has already chosen which tokens of which sequences this step computes.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from parallm.config import CacheConfig, ModelConfig, resolve_kv_cache_dtype
from parallm.engine.profiler import step_label
from parallm.engine.prompt_logprobs import (
    PromptScores,
    PromptSpan,
    prompt_logit_chunks,
    prompt_spans,
    score_prompt_spans,
)
from parallm.engine.request import Sequence
from parallm.engine.sampler import (
    Sampler,
    SamplerOutput,
    SamplingRow,
    SamplingTensors,
    greedy_argmax,
    host_to_device,
)
from parallm.engine.scheduler import ScheduledBatch
from parallm.engine.spec.verify import DraftVerifier, GreedyChains, StepRows, tree_of
from parallm.engine.step_inputs import (
    StepInputs,
    dummy_inputs,
    prepare,
    prepare_decode,
    prepare_staged,
)
from parallm.layers.attention import (
    AttentionBackend,
    AttentionMetadata,
    ForwardContext,
    ReferenceAttention,
)

if TYPE_CHECKING:
    from parallm.engine.decode_graph import DecodeGraphs
    from parallm.engine.mixed_graph import MixedGraphs
    from parallm.engine.spec.device_drafts import DeviceDrafts
    from parallm.engine.spec.history import TokenHistory
    from parallm.engine.verify_graph import VerifyGraphs, VerifyShape

_CPU_DEFAULT_KV_BYTES = 1 << 30


@dataclass
class StepHandle:
    """A launched step: its sampled tokens on the device and their copy to the host."""

    batch: ScheduledBatch
    result: SamplerOutput | None  # device tensors
    host_token_ids: torch.Tensor | None
    event: torch.cuda.Event | None = None
    # Scores of prompt tokens, already on the host (only requests with prompt_logprobs).
    prompt_logprobs: list[PromptScores] = field(default_factory=list)

    def wait(self) -> SamplerOutput | None:
        """The step's result with the token ids on the host; blocks until they are there."""
        if self.result is None:
            return None
        if self.event is not None:
            self.event.synchronize()
        if self.result.chains is not None:  # every row's argmax: walk the chains now
            emitted = self.result.chains.emitted(self.host_token_ids.tolist())
            return SamplerOutput(token_ids=torch.tensor([t[0] for t in emitted]),
                                 spec_token_ids=emitted)  # fmt: skip
        # A clone: a graph's host ring row is rewritten two replays later.
        ids = self.host_token_ids.clone()
        return dataclasses.replace(self.result, token_ids=ids, host_token_ids=None)

    def bonus_token_ids(self) -> torch.Tensor:
        """On the device, the token each sequence of a greedy verify step samples after its
        last draft: the next step's known token if every draft is accepted."""
        rows = self.result.chains.last_rows()
        return self.result.token_ids[
            host_to_device(rows.tolist(), torch.long, self.result.token_ids.device)
        ]


def kv_heads_per_rank(cfg: ModelConfig, tp_size: int = 1) -> int:
    """KV heads one tensor-parallel rank caches (a head is replicated when there are fewer
    KV heads than ranks), as ``QKVParallelLinear`` splits them."""
    return max(1, cfg.num_key_value_heads // tp_size)


def kv_bytes_per_block(
    cfg: ModelConfig, block_size: int, dtype: torch.dtype, tp_size: int = 1
) -> int:
    """Bytes one block takes across all layers (keys and values), on one rank; ``dtype`` is
    the cache's element type (one byte for fp8)."""
    elem = torch.empty((), dtype=dtype).element_size()
    heads = kv_heads_per_rank(cfg, tp_size)
    per_token = 2 * cfg.num_hidden_layers * heads * cfg.head_dim * elem
    return per_token * block_size


class ModelRunner:
    """Executes scheduled steps on one device."""

    def __init__(
        self,
        model: nn.Module,
        model_cfg: ModelConfig,
        cache_cfg: CacheConfig,
        device: torch.device,
        dtype: torch.dtype,
        backend: AttentionBackend | None = None,
        eos_token_ids: tuple[int, ...] = (),
        fused_kernels: bool = False,
        tp_size: int = 1,
    ) -> None:
        self.model = model
        self.model_cfg = model_cfg
        self.cache_cfg = cache_cfg
        self.device = device
        self.dtype = dtype
        # The KV cache's element type: the model's, or float8 e4m3 (``cache_cfg.cache_dtype``).
        self.kv_cache_dtype = resolve_kv_cache_dtype(cache_cfg.cache_dtype, dtype)
        self.backend = backend or ReferenceAttention()
        self.sampler = Sampler()
        # Not the bound ``self._sampling_row``: the verifier would then hold the runner, and the
        # cycle would keep the weights, KV cache and graphs alive after the engine is dropped.
        rows = functools.partial(sampling_row, eos_token_ids=eos_token_ids)
        self.verifier = DraftVerifier(self.sampler, rows, model_cfg.vocab_size, device)
        self.eos_token_ids = eos_token_ids
        # Triton kernels (CUDA only): the greedy argmax, and the one-row chain of batch-1 graphs.
        self.fused_kernels = fused_kernels
        self.kv_caches: list[torch.Tensor] = []
        self.graphs: DecodeGraphs | None = None
        # Graph-captured verify steps of speculative decoding (engine/verify_graph.py).
        self.verify_graphs: VerifyGraphs | None = None
        self.mixed_graphs: MixedGraphs | None = None
        # The device drafter's token buffers and tail (``enable_device_drafts``), or None.
        self.device_drafts: DeviceDrafts | None = None
        self.tp_size = tp_size
        # Tensor parallelism: called with every eager step's inputs and prompt spans before
        # the forward, so that the other ranks run the same forward (and collectives).
        self.step_listener: Callable[[StepInputs, list[PromptSpan]], None] | None = None
        # Likewise with a graph-replayed decode step's arrays (``DecodeGraphs.run``'s), so that
        # the other ranks replay the same graph.
        self.graph_step_listener: Callable[..., None] | None = None
        # While the engine's profiler runs, each step's launch is a range named by its shape
        # (profiler.step_label), so a trace gives the device time of a step of each shape.
        self.annotate_steps = False
        # Set by a drafter that reads the target's hidden states (Medusa): every step then runs
        # eagerly and its SamplerOutput carries each sampling sequence's last hidden state.
        self.keep_hidden = False

    @property
    def block_size(self) -> int:
        return self.cache_cfg.block_size

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """One ``[2, num_blocks + 1, block_size, Hkv, D]`` tensor per layer.

        The extra last block is scratch space that padded CUDA-graph rows write into.
        Zero-filled so that all of its memory is committed now: on CPU an untouched page costs
        nothing until first written, and the allocator hands out never-used blocks before it
        evicts cached ones, so a lazily committed cache would grow the process's memory with
        every new prefix until the whole reservation was resident.
        """
        cfg = self.model_cfg
        heads = kv_heads_per_rank(cfg, self.tp_size)
        shape = (2, num_blocks + 1, self.block_size, heads, cfg.head_dim)
        self.kv_caches = [
            torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device)
            for _ in range(cfg.num_hidden_layers)
        ]
        self.cache_cfg.num_blocks = num_blocks

    def plan_num_blocks(
        self, max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int,
        reserve_bytes: int = 0,
    ) -> int:  # fmt: skip
        """How many blocks fit: a byte budget on CPU, the measured free card on CUDA less
        ``reserve_bytes`` that something allocates after the cache."""
        per_block = kv_bytes_per_block(
            self.model_cfg, self.block_size, self.kv_cache_dtype, self.tp_size
        )
        if self.cache_cfg.kv_cache_memory is not None:
            return int(self.cache_cfg.kv_cache_memory // per_block) - 1
        if self.device.type != "cuda":
            return _CPU_DEFAULT_KV_BYTES // per_block - 1
        peak = self.profile_peak_memory(max_num_batched_tokens, max_num_seqs, max_model_len)
        free, total = torch.cuda.mem_get_info(self.device)
        # Memory that other processes or the CUDA context hold counts against the fraction.
        others = total - free - torch.cuda.memory_reserved(self.device)
        budget = total * self.cache_cfg.gpu_memory_utilization - peak - others - reserve_bytes
        return max(0, int(budget // per_block) - 1)

    @torch.inference_mode()
    def profile_peak_memory(self, num_tokens: int, num_seqs: int, max_model_len: int) -> int:
        """Peak bytes of weights plus the activations of the largest step we may run."""
        num_tokens = max(num_tokens, num_seqs)
        inputs = dummy_inputs(num_tokens, max_model_len, self.block_size)
        self.allocate_kv_cache(int(inputs.block_tables.max()) + 1)
        torch.cuda.reset_peak_memory_stats(self.device)
        hidden = self._hidden(inputs, None)
        self.model.compute_logits(hidden[:num_seqs]).float()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        kv = sum(t.numel() * t.element_size() for t in self.kv_caches)
        self.kv_caches = []
        torch.cuda.empty_cache()
        return peak - kv

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        """Flatten the batch: token ids, positions, slots, query offsets, block tables."""
        return prepare(batch, self.block_size)

    def prepare_decode(self, batch: ScheduledBatch) -> tuple[np.ndarray, ...]:
        """Inputs of a pure decode step (``step_inputs.prepare_decode``)."""
        return prepare_decode(batch, self.block_size)

    def _build_metadata(self, inputs: StepInputs) -> AttentionMetadata:
        query_lens = np.diff(inputs.query_start_loc)
        trees = {}
        if inputs.tree_num_nodes is not None:
            trees = dict(tree_num_nodes=self._to_device(inputs.tree_num_nodes),
                         tree_visible=self._to_device(inputs.tree_visible))  # fmt: skip
        return AttentionMetadata(
            slot_mapping=self._to_device(inputs.slot_mapping),
            query_start_loc=self._to_device(inputs.query_start_loc),
            seq_lens=self._to_device(inputs.seq_lens),
            block_tables=self._to_device(inputs.block_tables),
            max_query_len=int(query_lens.max()),
            max_seq_len=int(inputs.seq_lens.max()),
            query_start_loc_cpu=inputs.query_start_loc.tolist(),
            seq_lens_cpu=inputs.seq_lens.tolist(),
            decode_order=self._decode_order(inputs.seq_lens) if query_lens.max() == 1 else None,
            **trees,
        )

    def _decode_order(self, seq_lens: np.ndarray) -> torch.Tensor | None:
        """An eager pure decode step's rows longest first, as the decode graphs stage them: the
        order pays here too, and the decode kernel runs the variant the capture compiled (an
        unordered variant would be compiled under load, stalling that step for most of a
        second). CUDA only: the CPU backends ignore it."""
        if self.device.type != "cuda":
            return None
        from parallm.kernels.paged_decode import longest_first  # imports triton

        return self._to_device(longest_first(seq_lens))

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device, non_blocking=True)

    def capture_cuda_graphs(self, sizes: list[int], max_model_len: int) -> float:
        """Capture decode graphs for ``sizes``; returns the seconds it took. With the Triton
        kernels (``fused_kernels``), batch 1 runs the one-row kernel chain, except under tensor
        parallelism: the chain has no collectives."""
        from parallm.engine.decode_graph import DecodeGraphs  # imports triton

        max_blocks = -(-max_model_len // self.block_size)
        self.graphs = DecodeGraphs(
            self.model, self.backend, self.kv_caches, sizes, max_blocks, max_model_len,
            scratch_block=self.cache_cfg.num_blocks, block_size=self.block_size,
            device=self.device, one_row=self.fused_kernels and self.tp_size == 1,
        )  # fmt: skip
        self.graphs.capture()
        return self.graphs.capture_seconds

    def capture_verify_graphs(
        self, shapes: list[VerifyShape], max_model_len: int, capture: bool = True
    ) -> float:
        """Verify graphs for ``shapes`` (``capture=False``: the same buffers run eagerly, for
        tests off CUDA); returns the seconds capture took. Not under tensor parallelism: the
        other ranks would have to replay them too."""
        from parallm.engine.verify_graph import VerifyGraphs

        self.verify_graphs = VerifyGraphs(
            self.model, self.backend, self.kv_caches, shapes, -(-max_model_len // self.block_size),
            max_model_len, scratch_block=self.cache_cfg.num_blocks, block_size=self.block_size,
            device=self.device, capture=capture,
        )  # fmt: skip
        if capture:
            self.verify_graphs.capture()
        return self.verify_graphs.capture_seconds

    def capture_mixed_graphs(
        self, sizes: list[int], max_num_seqs: int, max_model_len: int, capture: bool = True
    ) -> float:
        """Graphs of steps that carry prompt tokens, one per padded token count in ``sizes``
        (``capture=False``: the same buffers run eagerly, for tests off CUDA); returns the
        seconds capture took. Not under tensor parallelism: the other ranks would have to
        replay them too."""
        from parallm.engine.mixed_graph import MixedGraphs

        self.mixed_graphs = MixedGraphs(
            self.model, self.backend, self.kv_caches, sizes, max_num_seqs,
            {t: self._prefill_tile(t) for t in sizes}, self._prefill_tile(1),
            -(-max_model_len // self.block_size),
            max_model_len, scratch_block=self.cache_cfg.num_blocks, block_size=self.block_size,
            device=self.device, capture=capture,
        )  # fmt: skip
        if capture:
            self.mixed_graphs.capture()
        return self.mixed_graphs.capture_seconds

    def _prefill_tile(self, max_query_len: int) -> int:
        """Query tokens a tile of the backend's prefill kernel takes at ``max_query_len``
        (the reference backend has no tiles: any cut serves)."""
        if self.backend.name != "triton":
            return max_query_len
        from parallm.kernels.paged_prefill import prefill_tokens_per_tile

        cfg = self.model_cfg
        return prefill_tokens_per_tile(cfg.head_dim, cfg.num_attention_heads,
                                       cfg.num_key_value_heads, self.dtype, self.device,
                                       max_query_len)  # fmt: skip

    def enable_device_drafts(
        self, num_drafts: int, min_n: int, max_n: int, max_model_len: int,
        history: TokenHistory | None = None,
    ) -> None:  # fmt: skip
        """Device drafting for the verify graphs' chains of ``num_drafts`` drafts (the
        engine's device mode, spec/device_drafts.py): buffers for their largest batch;
        ``history``: the ring of earlier requests its tail drafts from where a sequence's own
        lookup finds nothing (copied to the device, kept there in step)."""
        from parallm.engine.spec.device_drafts import DeviceDrafts

        q = 1 + num_drafts
        sizes = [s.batch for s in self.verify_graphs.shapes if s.tokens_per_seq == q and not s.tree]
        if not sizes:
            raise ValueError(f"no verify graph holds chains of {num_drafts} drafts")
        self.device_drafts = DeviceDrafts(max(sizes), max_model_len + 2 * q, num_drafts, min_n,
                                          max_n, self.device, self.fused_kernels,
                                          history=history)  # fmt: skip

    def capture_tail_graphs(self) -> float:
        """The device drafter's tail captured for every live batch size
        (spec/tail_graphs.py), where the verify graphs were captured (CUDA); the seconds it
        took (0 where nothing is captured: the tail then runs eagerly)."""
        graphs = self.verify_graphs
        if self.device_drafts is None or graphs is None or not graphs.captures:
            return 0.0
        from parallm.engine.spec.tail_graphs import capture_tails

        self.device_drafts.graphs = capture_tails(self.device_drafts, graphs, self.block_size)
        return self.device_drafts.graphs.capture_seconds

    def device_tail_fits(self, batch: ScheduledBatch) -> bool:
        """Whether ``batch``, a verify step of full greedy chains, can run the device tail: a
        captured shape of its size and chain length holds it and the buffers its tokens."""
        drafts = self.device_drafts
        if drafts is None or not _greedy_chains(batch) or not drafts.fits(
            [item.seq for item in batch.seqs]
        ):  # fmt: skip
            return False
        # The buffers hold the largest captured chain shape's batch (``fits`` checked it), so
        # a chain of k drafts a sequence has a shape.
        return all(len(item.draft_token_ids) == drafts.num_drafts and item.samples
                   for item in batch.seqs)  # fmt: skip

    def _use_graph(self, batch: ScheduledBatch) -> bool:
        if self.graphs is None or len(batch.seqs) > self.graphs.max_batch or self.keep_hidden:
            return False
        # A step with drafts runs eagerly. One that admitted one-token prompts (full prefix
        # hits) beside decode rows whose tokens are on the device replays: the decode rows'
        # ids come from the device, the prompts' from the host (``DecodeGraphs.run``).
        return batch.is_pure_decode

    def launch(self, batch: ScheduledBatch, device_ids: torch.Tensor | None = None) -> StepHandle:
        """Start a step and the copy of its tokens to the host, without waiting for either."""
        if self.annotate_steps:  # a profile is running: name the step by its shape
            with torch.profiler.record_function(step_label(batch)):
                result, scored = self.execute(batch, device_ids)
        else:
            result, scored = self.execute(batch, device_ids)
        if result is None or self.device.type != "cuda":
            host = None if result is None else result.token_ids
            return StepHandle(batch, result, host, prompt_logprobs=scored)
        host = result.host_token_ids  # a graph's argmax wrote them to the host already
        if host is None:
            host = torch.empty(result.token_ids.shape, dtype=torch.long, pin_memory=True)
            host.copy_(result.token_ids, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return StepHandle(batch, result, host, event, prompt_logprobs=scored)

    @torch.inference_mode()
    def execute(
        self, batch: ScheduledBatch, device_ids: torch.Tensor | None = None
    ) -> tuple[SamplerOutput | None, list[PromptScores]]:
        """Run one step; returns one sampled token per sampling sequence, in batch order, and
        the scores of the prompt tokens this step computed for requests with prompt_logprobs.

        ``device_ids``: each sequence's known token, on the device (the previous step's
        samples): a decode batch's inputs, or the first of a verify step's, whose drafts come
        from the host (``ScheduledBatch.known_on_device``).
        """
        greedy = host_ids = inputs = hidden = shape = None
        scored: list[PromptScores] = []
        if self._use_graph(batch):
            decode = self.prepare_decode(batch)
            if self.graph_step_listener is not None:
                self.graph_step_listener(*decode)
            logits, greedy, host_ids = self.graphs.run(*decode, device_ids=device_ids)
        else:
            inputs = prepare_staged(batch) if batch.staged_on_device else self.prepare(batch)
            # A decode row predicts an output token: only prompt chunks have prompt tokens to score.
            spans = prompt_spans(batch, inputs.query_start_loc) if batch.has_prompt_tokens else []
            if self.step_listener is not None:
                self.step_listener(inputs, spans)
            known = device_ids if batch.known_on_device else None
            if batch.device_tail and not batch.staged_on_device:
                self.device_drafts.upload([item.seq for item in batch.seqs])
            shape = self._verify_shape(inputs, spans)
            replayed = rows = None
            if shape is not None:
                replayed = self.verify_graphs.run(inputs, known, batch.staged_on_device, shape)
            elif self._mixed_graph_fits(batch, spans):
                rows = self._known_rows(inputs, known)
                replayed = self.mixed_graphs.run(inputs, known=rows)
            if batch.staged_on_device and replayed is None:  # its host inputs are placeholders
                raise RuntimeError("a verify step staged on the device found no graph to replay")
            if known is not None and replayed is None:  # the eager forward takes every id
                device_ids = self._with_known(inputs, rows or self._known_rows(inputs, known))
            if replayed is not None:  # the sampling rows' logits and hidden states
                logits, hidden = replayed
            elif spans or self.keep_hidden:
                logits, scored, hidden = self._forward(inputs, device_ids, spans)
            else:  # benchmarks and the interpreted-engine tests swap forward_logits
                logits = self.forward_logits(inputs, device_ids)
            hidden = hidden if self.keep_hidden else None
        if logits is None:
            return None, scored
        drafted = [item.draft_token_ids for item in batch.seqs if item.samples]
        if not any(drafted):
            out = self._sample(batch, logits, greedy, host_ids)
            if hidden is not None:
                out = dataclasses.replace(out, hidden_states=hidden)
            return out, scored
        return self._verify(batch, inputs, logits, hidden, drafted, shape), scored

    def _verify(
        self,
        batch: ScheduledBatch,
        inputs: StepInputs,
        logits: torch.Tensor,
        hidden: torch.Tensor | None,
        drafted: list[list[int]],
        shape: VerifyShape | None,
    ) -> SamplerOutput:
        """The tokens a step with drafts emits (``drafted``: each sampling sequence's drafts).
        Each drafted sequence has one row per draft after its own: the first rows are sampled
        as in any step, the drafts verified on the rows after them. ``shape``: the verify
        graph's shape that ran the step, None where it ran eagerly."""
        starts = itertools.accumulate((1 + len(d) for d in drafted[:-1]), initial=0)
        first = np.fromiter(starts, np.int64, len(drafted))
        if hidden is None and _greedy_chains(batch):  # walked when the argmax reaches the host
            if batch.device_tail:  # the argmax is the tail's first kernel
                argmax, next_drafts = self._device_tail(batch, logits, shape)
            else:
                argmax, next_drafts = greedy_argmax(logits, self.fused_kernels), None
            return SamplerOutput(argmax, chains=GreedyChains(first, drafted, next_drafts))
        argmax_rows = None
        if _plain_greedy(batch):  # every row's token in one kernel and one read
            argmax_rows = greedy_argmax(logits, self.fused_kernels).tolist()
            out = SamplerOutput(token_ids=torch.tensor([argmax_rows[i] for i in first]))
        else:
            out = self._sample(batch, logits[self._to_device(first)], None, None)
        step = StepRows(inputs.query_start_loc, inputs.slot_mapping, self.kv_caches)
        out, rows = self.verifier.verify(batch, out, logits, first, step, argmax_rows)
        if hidden is not None:  # each sequence's state at the row of its last emitted token
            last = self._to_device(np.array([r[-1] for r in rows]))
            out = dataclasses.replace(out, hidden_states=hidden[last])
        return out

    def _device_tail(
        self, batch: ScheduledBatch, logits: torch.Tensor, shape: VerifyShape | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every row's argmax and the device drafter's tail after this verify step
        (``DeviceDrafts.tail``, one graph replay where captured), staging the next step in
        ``shape``, the verify graph's that ran it: the argmax rows and the next drafts' host
        rows, the latter None when no verify graph ran the step (nothing to stage into)."""
        graphs = self.verify_graphs
        if shape is None:
            return greedy_argmax(logits, self.fused_kernels), None
        return self.device_drafts.tail(logits, graphs.inputs[shape], len(batch.seqs),
                                       self.block_size, graphs.scratch_block * self.block_size)  # fmt: skip

    def _verify_shape(self, inputs: StepInputs, spans: list[PromptSpan]) -> VerifyShape | None:
        """The verify graph's shape that runs this step, found once a step: None when no
        graph holds it, or the step has prompt tokens or other ranks to feed (it runs
        eagerly)."""
        if self.verify_graphs is None or spans or self.step_listener is not None:
            return None
        return self.verify_graphs.shape_for(inputs)

    def _mixed_graph_fits(self, batch: ScheduledBatch, spans: list[PromptSpan]) -> bool:
        """Whether a step that carries prompt tokens may replay a mixed graph (if one holds
        it): not when it scores prompt tokens or has other ranks to feed."""
        return (self.mixed_graphs is not None and batch.has_prompt_tokens and not spans
                and self.step_listener is None)  # fmt: skip

    def _known_rows(
        self, inputs: StepInputs, known: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, ids): the first row of each of the step's first ``len(known)`` sequences,
        which takes its ``known`` token from the device; None without such tokens."""
        if known is None:
            return None
        starts = inputs.query_start_loc[: len(known)].astype(np.int64)
        return self._to_device(starts), known

    def _with_known(
        self, inputs: StepInputs, known_rows: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """The step's input ids on the device: ``known_rows`` (``_known_rows``: the first row
        of each of the first sequences, a verify step's before its drafts, a step launched
        ahead's decode rows before the prompts it admitted) take their ids from the device,
        every other id comes from the host."""
        ids = self._to_device(inputs.input_ids)
        rows, known = known_rows
        ids[rows] = known
        return ids

    def _sample(
        self,
        batch: ScheduledBatch,
        logits: torch.Tensor,
        greedy: torch.Tensor | None,
        host_ids: torch.Tensor | None,
    ) -> SamplerOutput:
        """One token per sampling sequence from its row of ``logits``."""
        if _plain_greedy(batch):
            # The common offline case: skip building sampling tensors, one argmax on device.
            if greedy is None:
                greedy = greedy_argmax(logits, self.fused_kernels)
            return SamplerOutput(token_ids=greedy, host_token_ids=host_ids)
        rows = [self._sampling_row(item.seq) for item in batch.seqs if item.samples]
        tensors = SamplingTensors.build(rows, self.model_cfg.vocab_size, self.device)
        return self.sampler(logits.float(), tensors)

    def forward_logits(
        self, inputs: StepInputs, device_ids: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Logits (model dtype) at the sampling rows, or None when no sequence samples."""
        return self._forward(inputs, device_ids, [])[0]

    def _forward(
        self, inputs: StepInputs, device_ids: torch.Tensor | None, spans: list[PromptSpan]
    ) -> tuple[torch.Tensor | None, list[PromptScores], torch.Tensor | None]:
        """``forward_logits``, the scores of the spans' prompt tokens from the same pass, and
        the final hidden states of the sampling rows (``[rows, H]``, None with the logits)."""
        hidden = self._hidden(inputs, device_ids)
        rows, logits = self._sampling_logits(hidden, inputs)
        return logits, score_prompt_spans(self.model, hidden, spans) if spans else [], rows

    @torch.inference_mode()
    def execute_forward(self, inputs: StepInputs, prompt_rows: np.ndarray | None) -> None:
        """A tensor-parallel worker's share of a step: the driver's forward, sampling logits
        and prompt-scoring logits (for their collectives, in the driver's order); nothing is
        sampled here. ``prompt_rows``: the hidden-state rows the driver scores."""
        hidden = self._hidden(inputs, None)
        self._sampling_logits(hidden, inputs)
        if prompt_rows is not None:
            for _ in prompt_logit_chunks(self.model, hidden, prompt_rows):
                pass

    def _hidden(self, inputs: StepInputs, device_ids: torch.Tensor | None) -> torch.Tensor:
        """The final hidden state of every token of the step."""
        meta = self._build_metadata(inputs)
        ctx = ForwardContext(meta, self.kv_caches, self.backend)
        ids = self._to_device(inputs.input_ids) if device_ids is None else device_ids
        return self.model(ids, self._to_device(inputs.positions), ctx)

    def _sampling_logits(
        self, hidden: torch.Tensor, inputs: StepInputs
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The sampling rows of ``hidden`` and their logits; (None, None) when none samples."""
        if len(inputs.sample_indices) == 0:
            return None, None
        rows = hidden[self._to_device(inputs.sample_indices)]
        return rows, self.model.compute_logits(rows)

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        return sampling_row(seq, self.eos_token_ids)


def sampling_row(seq: Sequence, eos_token_ids: tuple[int, ...]) -> SamplingRow:
    """What the sampler needs to know about ``seq`` this step."""
    return SamplingRow(
        params=seq.params,
        prompt_token_ids=seq.prompt_token_ids,
        output_token_ids=seq.output_token_ids,
        generator=seq.generator,
        banned_token_ids=seq.banned_stop_token_ids(eos_token_ids),
    )


def _greedy_chains(batch: ScheduledBatch) -> bool:
    """Whether a verify step needs nothing but every row's argmax: plain greedy sequences
    whose drafts are chains, none sampled from a draft model's distribution."""
    return _plain_greedy(batch) and all(
        tree_of(item) is None and item.draft_probs is None for item in batch.seqs
    )


def _plain_greedy(batch: ScheduledBatch) -> bool:
    """Whether every sampling sequence's token is the plain argmax of its logits row: greedy,
    no penalties or logprobs, no banned stop tokens."""
    return all(item.seq.params.plain_greedy and not item.seq.bans_stop_tokens
               for item in batch.seqs if item.samples)  # fmt: skip
