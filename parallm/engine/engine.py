"""The engine: owns the scheduler, the KV cache manager and the runner, and drives the step loop."""

from __future__ import annotations

import functools
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from parallm.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    resolve_device,
    resolve_dtype,
    resolve_kv_cache_dtype,
)
from parallm.engine.executor import TensorParallelExecutor, WorkerSpec, check_tensor_parallel
from parallm.engine.kv_cache import KVCacheManager
from parallm.engine.mixed_graph import mixed_token_sizes
from parallm.engine.output_processor import OutputProcessor
from parallm.engine.profiler import EngineProfiler, ProfilerOff
from parallm.engine.request import Request, Sequence, SequenceStatus
from parallm.engine.runner import ModelRunner, StepHandle
from parallm.engine.sampler import SamplerOutput, host_to_device
from parallm.engine.scheduler import ScheduledBatch, Scheduler
from parallm.engine.spec.emit import append_verified
from parallm.engine.spec.stats import SpecStats
from parallm.engine.spec.step_costs import StepCosts
from parallm.engine.startup import (
    check_capacity,
    drafter_for,
    engine_summary,
    model_dir,
    on_cuda_unless_set,
)
from parallm.engine.verify_graph import drafter_shapes
from parallm.hub import TOKENIZER_PATTERNS, resolve_model_dir
from parallm.layers.attention import AttentionBackend
from parallm.layers.backends import check_kv_cache_dtype_support, select_backend
from parallm.layers.quantization import (
    check_stored_quantization,
    quantize_model,
)
from parallm.models.loader import load_model
from parallm.outputs import RequestOutput
from parallm.sampling_params import MAX_SEED, SamplingParams
from parallm.tokenizer import eos_token_ids, id_tokenizer, load_tokenizer

logger = logging.getLogger("parallm")


class LLMEngine:
    """Continuous-batching engine: add requests, call ``step()`` until none are left."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig | None = None) -> None:
        self.config = config
        cache_cfg, sched_cfg, backend = self._check_config(model_config)
        # A draft model loads with the target; a datastore is read and checked here.
        self.drafter = drafter_for(config, self.model_config, self.model_dir)
        self.draft_model = self.drafter.model if self.drafter is not None else None
        # After the drafter: a method that cannot run sharded says so by name.
        check_tensor_parallel(config, self.model_config, self.device)
        started = time.perf_counter()
        self.tokenizer = self._load_tokenizer()
        self.eos_token_ids = eos_token_ids(self.model_dir, self.tokenizer)
        self.executor = self._start_executor(cache_cfg, sched_cfg)
        try:
            num_blocks = self._start_runner(cache_cfg, sched_cfg, backend)
        except BaseException:
            self.close()
            raise
        if self.draft_model is not None:
            self.draft_model.allocate_kv_cache(num_blocks)
        self.kv = KVCacheManager(num_blocks, cache_cfg.block_size, cache_cfg.enable_prefix_caching)
        self.scheduler = Scheduler(sched_cfg, self.kv)
        self.scheduler.full_chains = self.drafter is not None and self.drafter.full_chains
        self.outputs = OutputProcessor(self.tokenizer, self.eos_token_ids, self.max_model_len)
        self.requests: dict[str, Request] = {}
        if self.drafter is not None:
            self.drafter.measure_step_costs(self.async_scheduling)
        self.spec_stats = SpecStats()
        profiling = config.profiler_config
        self.profiler = EngineProfiler(profiling) if profiling and profiling.enabled else None
        self._inflight: StepHandle | None = None
        self.num_overlapped_steps = 0
        self.closed = False  # close() freed the runner
        self.num_discarded_steps = 0  # verify steps launched ahead whose drafts were rejected
        self.load_seconds = time.perf_counter() - started
        self.num_steps = 0
        self.num_generated_tokens = 0  # tokens appended to sequences (discarded ones excluded)
        # Called with the number of tokens each launched step computes (prompt chunks and
        # decode tokens), from the thread that calls step(); the server feeds a histogram.
        self.step_observer: Callable[[int], None] | None = None

    def _check_config(
        self, model_config: ModelConfig | None
    ) -> tuple[CacheConfig, SchedulerConfig, AttentionBackend]:
        """Resolve and check every argument before the (slow) model load; the cache and
        scheduler configs and the attention backend."""
        config = self.config
        self.device = resolve_device(config.device)
        if self.device.type == "cuda" and self.device.index is not None:
            # Graph capture, Triton launches and the step events use the current device.
            torch.cuda.set_device(self.device)
        # A Hub id becomes its snapshot's directory here (a download unless cached).
        self.model_dir = model_dir(config)
        if model_config is None and self.model_dir is None:
            raise ValueError(
                "model: a model directory is required (or pass a ModelConfig for dummy)"
            )
        self.model_config = model_config or ModelConfig.from_path(self.model_dir)
        self.dtype = resolve_dtype(config.dtype, self.model_config, self.device)
        self.max_model_len = config.resolve_max_model_len(self.model_config)
        self.stored_quantization = check_stored_quantization(
            config.quantization, self.model_config.raw, config.load_format
        )
        cache_cfg = config.cache_config()
        sched_cfg = config.scheduler_config(self.max_model_len, self.device)
        backend = select_backend(config.attention_backend, self.device)
        self.kv_cache_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, self.dtype)
        check_kv_cache_dtype_support(backend, self.kv_cache_dtype, self.device)
        if config.fused_kernels and self.device.type != "cuda":
            raise ValueError("fused_kernels=True needs device='cuda' (Triton kernels)")
        self.fused_kernels = on_cuda_unless_set(config.fused_kernels, self.device)
        self.tp_size = config.tensor_parallel_size
        # Tensor-parallel workers take host inputs, which a step run ahead has not got yet.
        # Set here, before the graph capture: enable_device_drafting reads it.
        self.async_scheduling = self.tp_size == 1 and on_cuda_unless_set(
            config.async_scheduling, self.device
        )
        return cache_cfg, sched_cfg, backend

    def _start_runner(
        self, cache_cfg: CacheConfig, sched_cfg: SchedulerConfig, backend: AttentionBackend
    ) -> int:
        """Load the model (and a draft model) into the runner, allocate the KV cache and
        capture the CUDA graphs; the number of KV blocks."""
        self.runner = ModelRunner(
            self._load_model(), self.model_config, cache_cfg, self.device, self.dtype,
            backend, self.eos_token_ids, fused_kernels=self.fused_kernels,
            tp_size=self.tp_size,
        )  # fmt: skip
        if self.draft_model is not None:
            self.draft_model.load(self.runner, self.max_model_len)
        num_blocks = self._plan_num_blocks(cache_cfg.block_size, sched_cfg)
        self.runner.allocate_kv_cache(num_blocks)
        if self.executor is not None:
            self.executor.allocate_kv_cache(num_blocks)
            self.runner.step_listener = self.executor.send_step
            self.runner.graph_step_listener = self.executor.send_graph_step
        self.graph_capture_seconds = self._capture_graphs(sched_cfg.max_num_seqs)
        # Steps that carry prompt tokens in graphs too (not under tensor parallelism).
        mixed = mixed_token_sizes(sched_cfg.max_num_batched_tokens)
        if self.graph_capture_seconds is not None and self.executor is None and mixed:
            self.graph_capture_seconds += self.runner.capture_mixed_graphs(
                mixed, sched_cfg.max_num_seqs, self.max_model_len
            )
        # Verify steps of speculation in graphs too (not under tensor parallelism).
        verify = self.drafter is not None and self.executor is None
        if verify and self.graph_capture_seconds is not None:
            shapes = drafter_shapes(self.drafter, self._graph_sizes(sched_cfg.max_num_seqs),
                                    sched_cfg.max_num_batched_tokens)  # fmt: skip
            # None when no graph size's drafted tokens fit the step's token budget: every
            # drafted step then runs eagerly.
            if shapes:
                self.graph_capture_seconds += self.runner.capture_verify_graphs(
                    shapes, self.max_model_len
                )
                self.enable_device_drafting()
        return num_blocks

    def enable_device_drafting(self) -> bool:
        """Draft on the device where it can (docs/DEVICE_DRAFTER.md): greedy prompt lookup
        (and the drafter's ring of earlier requests, kept on the device too) under async
        scheduling, over the verify graphs' full chains; its tail captured too where they were
        (counted in ``graph_capture_seconds``). Whether it is on."""
        if not self._drafts_on_device() or self.runner.verify_graphs is None:
            return False
        spec = self.drafter.config
        try:
            self.runner.enable_device_drafts(spec.num_speculative_tokens, spec.prompt_lookup_min,
                                             spec.prompt_lookup_max, self.max_model_len,
                                             history=self.drafter.history)  # fmt: skip
        except ValueError:  # no graph of full chains (the token budget is too small)
            return False
        if hasattr(self, "scheduler"):  # enabled after start-up (the tests off CUDA)
            self.use_full_chains(True)
        else:  # the scheduler, made after the runner, takes the drafter's setting
            self.drafter.full_chains = True
        seconds = self.runner.capture_tail_graphs()  # 0 without captured verify graphs
        if self.graph_capture_seconds is not None:
            self.graph_capture_seconds += seconds
        return True

    def use_full_chains(self, on: bool) -> None:
        """Whether every drafted sequence verifies ``num_speculative_tokens`` rows (the device
        drafter's fixed shapes): the drafter pads its chains with fillers, and the scheduler
        cuts them by the context alone, not by ``max_tokens``."""
        self.drafter.full_chains = self.scheduler.full_chains = on

    def _drafts_on_device(self) -> bool:
        """Whether the drafter is one the device drafter serves: prompt lookup under async
        scheduling (``enable_device_drafting`` also needs the verify graphs)."""
        spec = self.drafter.config if self.drafter is not None else None
        return spec is not None and spec.method == "ngram" and self.async_scheduling

    def _start_executor(
        self, cache_cfg: CacheConfig, sched_cfg: SchedulerConfig
    ) -> TensorParallelExecutor | None:
        """Ranks 1..N-1 of a tensor-parallel engine, loading their shards as this process
        loads rank 0's; None for one rank."""
        if self.tp_size == 1:
            return None
        cfg = self.config
        return TensorParallelExecutor(WorkerSpec(
            self.model_dir, self.model_config, cache_cfg, self.dtype, str(self.device),
            self.max_model_len + 1, cfg.load_format, cfg.seed, cfg.quantization,
            cfg.attention_backend, self.tp_size, self.fused_kernels,
            sched_cfg.max_num_batched_tokens, sched_cfg.max_num_seqs, self.max_model_len,
            tuple(self._graph_sizes(sched_cfg.max_num_seqs)),
        ))  # fmt: skip

    def close(self) -> None:
        """Stop a tensor-parallel engine's worker processes and free this process's device
        memory (weights, KV cache, CUDA graphs, the drafter's state), so that another engine
        started in the same process gets it; safe to call more than once. The runner and
        its graphs reference each other, so dropping the engine alone frees nothing until a
        garbage collection."""
        executor = getattr(self, "executor", None)
        if executor is not None:
            executor.close()
        profiler = getattr(self, "profiler", None)
        if profiler is not None and profiler.running:  # what it recorded is kept, if it can be
            try:
                profiler.stop()
            except OSError:  # closing frees the engine whatever became of the trace
                logger.exception("the profile running at close could not be written")
        self.closed = True
        self._inflight = None
        self.runner = self.drafter = self.draft_model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _load_model(self) -> torch.nn.Module:
        cfg = self.config
        model = load_model(
            self.model_dir, self.model_config, self.dtype, self.device,
            max_positions=self.max_model_len + 1, load_format=cfg.load_format, seed=cfg.seed,
            packed=True, tp_size=self.tp_size,
        )  # fmt: skip
        if cfg.quantization is not None:
            quantize_model(model, cfg.quantization)
        if self.fused_kernels:
            from parallm.layers.triton_layers import use_triton_layers  # imports triton

            use_triton_layers(model)
        return model

    def _plan_num_blocks(self, block_size: int, sched_cfg: SchedulerConfig) -> int:
        # The device drafter's copy of the ring (a datastore's base and index too) comes after
        # the cache: its bytes stay out of the cache's share, but only where that drafter can
        # come on (never under enforce_eager: a datastore's copy is up to a GB of cache).
        graphs = bool(self._graph_sizes(sched_cfg.max_num_seqs))  # verify graphs follow them
        history = self.drafter.history if graphs and self._drafts_on_device() else None
        reserve = history.device_bytes() if history is not None else 0
        plan = functools.partial(self.runner.plan_num_blocks, sched_cfg.max_num_batched_tokens,
                                 sched_cfg.max_num_seqs, self.max_model_len, reserve)  # fmt: skip
        # Each tensor-parallel rank measures its own card; every rank takes the fewest blocks.
        num_blocks = plan() if self.executor is None else self.executor.plan_num_blocks(plan)
        if self.draft_model is not None:  # its cache, as many blocks, shares the budget
            num_blocks = self.draft_model.target_share(num_blocks)
        # Past twice what max_num_seqs full-length sequences need, blocks only feed the prefix
        # cache; the cap keeps start-up fast for small models on big cards.
        blocks_per_seq = -(-self.max_model_len // block_size)
        num_blocks = min(num_blocks, 2 * sched_cfg.max_num_seqs * blocks_per_seq)
        check_capacity(num_blocks, block_size, self.max_model_len)
        return num_blocks

    def _graph_sizes(self, max_num_seqs: int) -> list[int]:
        """The decode graphs' batch sizes (none: every step runs eagerly)."""
        if self.device.type != "cuda" or self.config.enforce_eager:
            return []
        return [s for s in self.config.cuda_graph_sizes if s <= max_num_seqs] or [1]

    def _capture_graphs(self, max_num_seqs: int) -> float | None:
        sizes = self._graph_sizes(max_num_seqs)
        if not sizes:
            return None
        capture = functools.partial(self.runner.capture_cuda_graphs, sizes, self.max_model_len)
        # Tensor parallelism: every rank captures the same sizes, collectives included, and
        # replays the graph that rank 0 replays (ModelRunner.graph_step_listener).
        return capture() if self.executor is None else self.executor.capture_graphs(capture)

    def _load_tokenizer(self) -> Any | None:
        cfg = self.config
        if cfg.skip_tokenizer_init:
            return None
        if cfg.tokenizer is not None:
            # A tokenizer of another Hub repository is taken at that repository's main.
            revision = cfg.revision if cfg.tokenizer == cfg.model else None
            return load_tokenizer(resolve_model_dir(
                cfg.tokenizer, field="tokenizer", revision=revision, download_dir=cfg.download_dir,
                patterns=TOKENIZER_PATTERNS, required=("tokenizer*",),
            ))  # fmt: skip
        if self.model_dir is not None:
            return load_tokenizer(self.model_dir)
        if cfg.load_format == "dummy":
            return id_tokenizer(self.model_config.vocab_size)
        return None

    @property
    def kv_capacity_tokens(self) -> int:
        return self.kv.num_blocks * self.kv.block_size

    def summary(self) -> str:
        """One line for start-up: model, dtype, device, attention backend and KV capacity."""
        return engine_summary(self)

    def validate_params(self, params: SamplingParams) -> None:
        """ValueError for what this engine cannot honour: stop strings without a tokenizer."""
        if params.stop and self.tokenizer is None:
            raise ValueError(
                "stop strings need a tokenizer, and this engine has none (skip_tokenizer_init="
                "True or no tokenizer files); use stop_token_ids instead"
            )

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        """ValueError naming the problem: empty, too long, or ids outside the vocabulary."""
        if len(prompt_token_ids) == 0:
            raise ValueError("prompt must not be empty")
        if len(prompt_token_ids) > self.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt_token_ids)} tokens, more than max_model_len "
                f"({self.max_model_len})"
            )
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt_token_ids must be integers in [0, {vocab}), got {bad[:5]}")

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        stream: bool = False,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a request; ``stream=True`` reports its new tokens every step.

        ``arrival_time`` (``time.monotonic()`` seconds, default now) is when the request
        reached the caller, so that queue time counts the wait before this call too.
        """
        if self.closed:
            raise RuntimeError("this engine was closed (LLM.close()); start a new one")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self.validate_prompt(prompt_token_ids)
        self.validate_params(params)
        now = time.monotonic() if arrival_time is None else arrival_time
        self._queue_request(request_id, list(prompt_token_ids), params, prompt, stream, now)

    def _queue_request(
        self, request_id: str, ids: list[int], params: SamplingParams, prompt: str | None,
        stream: bool, now: float,
    ) -> None:  # fmt: skip
        """Start a checked request: its sequences join the scheduler's queue."""
        seqs: list[Sequence] = []
        for i in range(params.n):
            generator = None
            if params.seed is not None:
                # Wraps so that every seed SamplingParams accepts stays in manual_seed's range.
                seed = (params.seed + i) % (MAX_SEED + 1)
                generator = torch.Generator(device=self.device).manual_seed(seed)
            parent = seqs[0] if seqs else None
            seqs.append(
                Sequence(request_id, i, ids, params, now, generator,
                         share_prefix=parent is not None, wait_for=parent)
            )  # fmt: skip
        request = Request(request_id, prompt, list(ids), params, seqs, now)
        self.requests[request_id] = request
        self.outputs.register(request, stream)
        for seq in seqs:
            self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and return its blocks; unknown ids are ignored (None).

        Returns the request's last output, in which the samples that were still running end
        with finish_reason "abort" (a stream's delta carries the text held back until then).
        """
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        aborted = [seq for seq in request.seqs if not seq.is_finished]
        for seq in aborted:
            seq.finish_reason = "abort"
            self.scheduler.finish(seq)
        if self.draft_model is not None:
            self.draft_model.release(self.scheduler.running)
        try:
            return self.outputs.last_output(request, aborted)
        finally:
            self.outputs.forget(request)

    def _fail_request(self, request_id: str) -> None:
        """End every sample of a request whose output processing raised."""
        request = self.requests.get(request_id)
        for seq in request.seqs if request is not None else []:
            if not seq.is_finished:
                seq.finish_reason = "error"
                self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix that no request holds (vLLM's ``reset_prefix_cache``):
        later prompts compute those blocks afresh."""
        self.kv.reset_prefix_cache()

    def start_profile(self) -> None:
        """Record the steps from now on (``profiler_config``; vLLM's ``start_profile``)."""
        if self.profiler is None:
            raise ProfilerOff()
        self.profiler.start()
        self.runner.annotate_steps = True

    def stop_profile(self) -> str:
        """Stop recording and write the profile; returns the trace's path."""
        if self.profiler is None:
            raise ProfilerOff()
        self.runner.annotate_steps = False
        return self.profiler.stop()

    def step(self) -> list[RequestOutput]:
        """Schedule, execute and post-process one step; returns outputs of progressed requests.

        With async scheduling, the next decode step is launched before this one's tokens are
        post-processed, so the host work of one step overlaps the GPU work of the next.
        """
        start = time.perf_counter()
        handle, self._inflight = self._inflight, None
        ran_ahead = handle is not None  # launched by the last call, before its tokens were read
        if handle is None:
            if self.drafter is not None:
                self.drafter.propose(self.scheduler.running)
            batch = self.scheduler.schedule()
            if not batch.seqs:
                return []
            batch.device_tail = self._device_tail(batch)
            handle = self._launch(batch)
            self._count_step(batch)
        if self.async_scheduling and handle.result is not None:
            if self._may_run_ahead():
                self._inflight = self._launch_continuation(handle)
            elif _staged_next(handle):
                self._inflight = self._launch_device_continuation(handle)
            elif handle.result.chains is not None:
                self._inflight = self._launch_verify_continuation(handle)
        outputs = self._finish_step(handle)
        if self.drafter is not None and self.drafter.costs is not None:
            _time_step(self.drafter.costs, handle.batch, ran_ahead, time.perf_counter() - start)
        return outputs

    def _may_run_ahead(self) -> bool:
        """Whether the next step may launch before this one's tokens reach the host. Drafts are
        proposed from those tokens, so with a drafter only a step that will carry none runs
        ahead: speculation and async scheduling take turns, by batch size and by whether every
        running request has paused its drafting."""
        return self.drafter is None or not self.drafter.will_draft(self.scheduler.running)

    def _launch(self, batch: ScheduledBatch) -> StepHandle:
        try:
            return self.runner.launch(batch)
        except BaseException as e:
            if self.executor is not None:
                if isinstance(e, Exception):  # a failed collective: name the rank that died
                    self.executor.explain(e)
                self.executor.abandon(f"a step raised {type(e).__name__}: {e}")
            raise

    def _launch_continuation(self, prev: StepHandle) -> StepHandle | None:
        batch = self.scheduler.schedule_continuation(prev.batch)
        if batch is None:
            return None
        ids = prev.result.token_ids
        decoding = batch.seqs[: len(batch.seqs) - batch.num_admitted]
        if not decoding:  # only prompts it admitted: every token is on the host
            ids = None
        elif len(decoding) != len(prev.batch.seqs):
            # The continuation keeps prev's order and only drops sequences: gather the rest.
            row_of = {item.seq.seq_id: i for i, item in enumerate(prev.batch.seqs)}
            rows = [row_of[item.seq.seq_id] for item in decoding]
            ids = ids[host_to_device(rows, torch.long, ids.device)]
        self.num_overlapped_steps += 1
        handle = self.runner.launch(batch, device_ids=ids)
        self._count_step(batch)
        return handle

    def _launch_verify_continuation(self, prev: StepHandle) -> StepHandle | None:
        """The verify step after ``prev`` (greedy chains, on the device), launched before
        ``prev``'s tokens reach the host as if all its drafts are accepted: n-gram drafts that
        continue ``prev``'s, behind the token ``prev`` samples after them. ``_finish_step``
        discards it when a sequence accepts fewer."""
        drafts = self.drafter.propose_ahead(prev.batch)
        if drafts is None:
            return None
        batch = self.scheduler.schedule_verify_continuation(prev.batch, drafts)
        if batch is None:
            return None
        self.num_overlapped_steps += 1
        handle = self.runner.launch(batch, device_ids=prev.bonus_token_ids())
        self._count_step(batch)
        return handle

    def _device_tail(self, batch: ScheduledBatch) -> bool:
        """Whether a verify step staged from the host also stages its successor on the device
        (the device drafter): async scheduling, full greedy chains that a graph and the device
        buffers hold, and blocks for the successor's worst case (reserved here: the tail
        computes its slots from this step's tables)."""
        if not self.async_scheduling or not self.runner.device_tail_fits(batch):
            return False
        q = 1 + self.drafter.config.num_speculative_tokens
        if any(item.seq.num_computed_tokens + q > self.max_model_len for item in batch.seqs):
            return False  # the reserve would pass the context (and the graphs' tables)
        if sum(self.kv.blocks_needed(item.seq, q) for item in batch.seqs) > self.kv.num_free_blocks:
            return False
        for item in batch.seqs:
            self.kv.allocate(item.seq, q)  # kept past the step's tokens until a rollback trims
        return True

    def _launch_device_continuation(self, prev: StepHandle) -> StepHandle | None:
        """The verify step after ``prev`` that ``prev``'s device tail staged: launched before
        ``prev``'s tokens reach the host, whatever it accepts; ``_finish_step`` gives it its
        drafts and rewinds its positions when they do."""
        if not self.drafter.drafts_for_all([item.seq for item in prev.batch.seqs]):
            return None  # a request the throttle paused needs the host path's plain steps
        batch = self.scheduler.schedule_device_continuation(
            prev.batch, self.drafter.config.num_speculative_tokens
        )
        if batch is None:
            return None
        self.num_overlapped_steps += 1
        handle = self.runner.launch(batch)
        self._count_step(batch)
        return handle

    def _give_device_drafts(self, handle: StepHandle) -> None:
        """The step in flight behind ``handle``, staged by ``handle``'s device tail, takes the
        drafts that tail proposed (its host placeholders filled in place, where its chains'
        walk reads them)."""
        pending = self._inflight
        if pending is None or not pending.batch.staged_on_device:
            return
        rows = handle.result.chains.next_drafts.tolist()
        for item, row in zip(pending.batch.seqs, rows, strict=True):
            *drafts, count = row  # k drafts, of which the lookup found ``count``
            item.draft_token_ids[:] = drafts
            item.num_fillers = len(drafts) - count

    def _discard_unless_accepted(
        self, handle: StepHandle, sampled: list[Sequence], emitted: list[list[int]]
    ) -> None:
        """Discard the verify step launched behind ``handle`` (``_launch_verify_continuation``)
        unless every sequence accepted all its drafts: its inputs assumed they would. Its KV
        slots go back; what it wrote there lies past every sequence's tokens, and the next
        step that computes those positions writes them again."""
        pending = self._inflight
        if pending is None or not pending.batch.known_on_device or pending.batch.staged_on_device:
            return
        drafts = {item.seq.seq_id: item.draft_token_ids for item in handle.batch.seqs}
        if all(
            len(t) == 1 + len(drafts[seq.seq_id]) for seq, t in zip(sampled, emitted, strict=True)
        ):
            return
        self._inflight = None
        self.num_discarded_steps += 1
        for item in pending.batch.seqs:
            if item.seq.status is SequenceStatus.RUNNING:
                self.kv.rollback(item.seq, item.num_scheduled_tokens)

    def _count_step(self, batch: ScheduledBatch) -> None:
        self.num_steps += 1
        if self.step_observer is not None:
            self.step_observer(batch.num_tokens)

    def _finish_step(self, handle: StepHandle) -> list[RequestOutput]:
        result = handle.wait()
        failed = self.outputs.record_prompt_logprobs(handle.prompt_logprobs)
        for seq in failed:
            self.scheduler.finish(seq)
        sampled = [item.seq for item in handle.batch.seqs if item.samples]
        # A sequence that ended (EOS, stop string, abort) after this step was launched: its
        # token here is the one extra step that async scheduling costs; drop it.
        if result is not None and any(seq.is_finished for seq in sampled):
            live = [i for i, seq in enumerate(sampled) if not seq.is_finished]
            sampled, result = [sampled[i] for i in live], result.select(live)
        if result is not None and result.spec_token_ids is not None:
            self._discard_unless_accepted(handle, sampled, result.spec_token_ids)
            if _staged_next(handle):
                self._give_device_drafts(handle)
            finished = self._append_verified(handle.batch, sampled, result)
        else:
            finished = self.outputs.process(sampled, result)
            if result is not None:
                self.num_generated_tokens += len(sampled)
        for seq in finished:
            self.scheduler.finish(seq)
        if self.drafter is not None:  # the ring of earlier requests, if it keeps one
            self.drafter.remember(finished)
        for request_id in self.outputs.errors:
            self._fail_request(request_id)
        outputs = self.outputs.collect(self.requests, sampled + failed)
        for out in outputs:
            if out.finished:
                self.outputs.forget(self.requests.pop(out.request_id))
        if result is not None and result.hidden_states is not None:  # Medusa reads them
            self.draft_model.observe(sampled, result.hidden_states)
        if self.draft_model is not None:  # finished or preempted sequences' draft blocks
            self.draft_model.release(self.scheduler.running)
        pending = self._inflight
        if pending is not None and all(item.seq.is_finished for item in pending.batch.seqs):
            self._inflight = None  # nothing left to read from it
        return outputs

    def _append_verified(
        self, batch: ScheduledBatch, sampled: list[Sequence], result: SamplerOutput
    ) -> list[Sequence]:
        """Every token a verified step emitted, appended (``append_verified``)."""
        # A step staged on the device is in flight behind this one: its slots (and its own
        # successor's) point into blocks past the rejected drafts, so those stay held.
        pending = self._inflight
        take_back = (
            self.kv.rewind if pending and pending.batch.staged_on_device else self.kv.rollback
        )
        finished, appended = append_verified(
            self.outputs, take_back, self.spec_stats, batch, sampled, result
        )
        self.num_generated_tokens += appended
        return finished

    @property
    def stats(self) -> dict[str, float]:
        """Counters for tests and metrics."""
        s = asdict(self.scheduler.stats)
        s.update(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_usage=self.kv.usage,
            num_free_blocks=self.kv.num_free_blocks,
            num_cached_blocks=self.kv.num_cached_blocks,
            num_steps=self.num_steps,
            num_generated_tokens=self.num_generated_tokens,
            num_overlapped_steps=self.num_overlapped_steps,
            num_discarded_steps=self.num_discarded_steps,
            spec_draft_tokens=self.spec_stats.draft_tokens,
            spec_accepted_tokens=self.spec_stats.accepted_tokens,
        )
        return s


def _staged_next(handle: StepHandle) -> bool:
    """Whether ``handle``'s step ran the device drafter's tail: its successor is staged."""
    chains = handle.result.chains if handle.result is not None else None
    return chains is not None and chains.next_drafts is not None


def _time_step(costs: StepCosts, batch: ScheduledBatch, ran_ahead: bool, seconds: float) -> None:
    """Give ``costs`` the seconds of a step that computed one known token per sequence (with
    or without drafts); any other step (prompt tokens) breaks their runs of like steps."""
    if batch.has_prompt_tokens:
        costs.interrupt(len(batch.seqs))
        return
    drafted = any(item.draft_token_ids for item in batch.seqs)
    costs.record(len(batch.seqs), drafted, ran_ahead, seconds)
