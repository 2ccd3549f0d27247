"""What an engine needs before its first step, apart from the engine itself: the drafter its
speculative config names, the model's local directory, checks on the KV cache's size, and the
one start-up line that says what was built."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from parallm.config import EngineConfig, ModelConfig
from parallm.engine.spec.datastore import datastore_tokens
from parallm.engine.spec.draft_model import MODEL_METHODS, DraftModelProposer
from parallm.engine.spec.drafting import Drafter
from parallm.engine.spec.medusa import MedusaProposer
from parallm.hub import DUMMY_MODEL_PATTERNS, MODEL_PATTERNS, resolve_model_dir
from parallm.layers.quantization import quantization_summary

if TYPE_CHECKING:
    from parallm.engine.engine import LLMEngine


def engine_summary(engine: LLMEngine) -> str:
    """One line for start-up: model, dtype, device, attention backend and KV capacity."""
    cfg = engine.model_config
    graphs = "CUDA graphs off"
    if engine.graph_capture_seconds is not None:
        sizes, mixed = engine.runner.graphs.sizes, engine.runner.mixed_graphs
        graphs = f"CUDA graphs for batch {sizes[0]}..{sizes[-1]}"
        if mixed is not None:
            graphs += f" and steps with prompt tokens up to {mixed.sizes[-1]} tokens"
        graphs += f" in {engine.graph_capture_seconds:.1f}s"
        if engine.fused_kernels and engine.tp_size > 1:
            graphs += " (no one-row chain at batch 1: it has no tensor-parallel collectives)"
    return (
        f"parallm: {engine.config.model or 'dummy'} ({cfg.architecture}, "
        f"{cfg.num_params / 1e6:.1f}M params) dtype={str(engine.dtype).replace('torch.', '')} "
        f"device={engine.device} attention={engine.runner.backend.name} "
        f"fused_kernels={'on' if engine.fused_kernels else 'off'} "
        f"{_tp_summary(engine.tp_size, engine.device)}"
        f"{quantization_summary(engine.config.quantization, engine.stored_quantization)} "
        f"max_model_len={engine.max_model_len} max_num_seqs={engine.scheduler.cfg.max_num_seqs} "
        f"KV cache "
        f"({str(engine.kv_cache_dtype).replace('torch.', '')}): {engine.kv.num_blocks} blocks x "
        f"{engine.kv.block_size} = {engine.kv_capacity_tokens} tokens; "
        f"loaded in {engine.load_seconds:.1f}s; {graphs}; "
        f"async scheduling {'on' if engine.async_scheduling else 'off'}"
        f"{_spec_summary(engine.drafter)}"
    )


def drafter_for(config: EngineConfig, target: ModelConfig, model_dir: str | None) -> Drafter | None:
    spec = config.speculative_config
    if spec is None:
        return None
    spec.check_implemented()
    # A draft model's configuration (Medusa: its heads) is checked here, before the target loads.
    model = None
    if spec.method in MODEL_METHODS:
        model = DraftModelProposer(spec, target, config)
    elif spec.method == "medusa":
        model = MedusaProposer(spec, target, config)
    datastore = datastore_tokens(spec, target.vocab_size, config.tokenizer or model_dir)
    return Drafter(spec, model, datastore)


def _spec_summary(drafter: Drafter | None) -> str:
    if drafter is None:
        return ""
    spec = drafter.config
    limit = spec.disable_by_batch_size
    batches = "every batch" if limit is None else f"batches of up to {limit}"
    if spec.min_tokens_per_step == "auto":
        batches += ", where a drafted step pays for itself (measured)"
    history = drafter.history
    if history is not None and history.start:
        batches += f", a datastore of {history.start - 1:,} tokens"
    return f"; speculative decoding: {spec.method}, {spec.num_speculative_tokens} tokens, {batches}"


def _tp_summary(tp_size: int, device: torch.device) -> str:
    if tp_size == 1:
        return ""
    backend = "nccl" if device.type == "cuda" else "gloo"
    return f"tensor_parallel_size={tp_size} ({backend}, one process per rank) "


def model_dir(config: EngineConfig) -> str | None:
    """The local directory of ``config.model`` (a directory or a Hub id), or None without one."""
    if config.model is None:
        return None
    dummy = config.load_format == "dummy"
    return resolve_model_dir(
        config.model, revision=config.revision, download_dir=config.download_dir,
        patterns=DUMMY_MODEL_PATTERNS if dummy else MODEL_PATTERNS,
        required=("config.json",) if dummy else ("config.json", "*.safetensors"),
    )  # fmt: skip


def check_capacity(num_blocks: int, block_size: int, max_model_len: int) -> None:
    if num_blocks * block_size < max_model_len:
        raise ValueError(
            f"the KV cache holds {num_blocks * block_size} tokens, fewer than max_model_len "
            f"({max_model_len}); raise kv_cache_memory / gpu_memory_utilization or lower "
            "max_model_len"
        )


def on_cuda_unless_set(flag: bool | None, device: torch.device) -> bool:
    """A feature flag whose default (None) is on for CUDA and off elsewhere."""
    return device.type == "cuda" if flag is None else flag
