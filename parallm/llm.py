"""The offline front end: ``LLM(model=...).generate(prompts, sampling_params)``."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from parallm.bundled import default_model_path
from parallm.chat_messages import check_messages
from parallm.chat_template import load_chat_template
from parallm.config import EngineConfig, ModelConfig
from parallm.engine.engine import LLMEngine
from parallm.engine.executor import is_torchrun_worker, torchrun_worker_main
from parallm.outputs import RequestOutput
from parallm.sampling_params import SamplingParams

logger = logging.getLogger("parallm")

PromptType = str | list[int] | dict[str, Any]
Message = dict[str, str]


class LLM:
    """Generate text for many prompts at once with continuous batching.

    ``model`` is a Hugging Face model directory (default: the bundled code model), a Hugging
    Face Hub id such as ``"Qwen/Qwen3-0.6B"`` (taken from the local cache, else downloaded
    unless ``HF_HUB_OFFLINE`` is set; ``revision=`` picks a branch, tag or commit and
    ``download_dir=`` the cache folder), or a ``config.json`` path together with
    ``load_format="dummy"`` (random weights, for benchmarks). ``skip_tokenizer_init=True``
    loads no tokenizer: prompts are token ids and outputs carry token ids with empty text.
    Other keywords are the fields of :class:`parallm.config.EngineConfig` (dtype, device,
    kv_cache_memory, gpu_memory_utilization, block_size, max_num_seqs, max_num_batched_tokens,
    enable_prefix_caching, enable_chunked_prefill, max_model_len, seed, ...).
    ``speculative_config`` turns on speculative decoding in vLLM's form, for example
    ``{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}`` (see
    :class:`parallm.engine.spec.config.SpeculativeConfig`); a bad value raises before loading.
    ``data_parallel_size=N`` runs N engine replicas, one process each, and sends each prompt to
    the replica that caches the longest prefix of it, else the least loaded one.
    ``engine_process=True`` runs the one engine in a process of its own, as the server does
    (``llm.engine`` is then that process's client, without the runner or scheduler).
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        if model is None:
            model = default_model_path()
        config = EngineConfig.from_kwargs(model=model, **kwargs)
        if is_torchrun_worker(config.tensor_parallel_size):
            # Rank 1..N-1 of a torchrun job: serve rank 0's engine until it closes, then exit.
            raise SystemExit(torchrun_worker_main(config.tensor_parallel_size, config.device))
        # Read and checked before the model loads; it then replaces the tokenizer's template,
        # for chat() and the server's chat route alike.
        chat_template = config.chat_template and load_chat_template(config.chat_template)
        model_config = None
        if model is not None and Path(model).is_file():
            if config.load_format != "dummy":
                raise ValueError("model: a config file alone needs load_format='dummy'")
            model_config = ModelConfig.from_path(model)
            config.model = None
        if config.data_parallel_size > 1 or config.engine_process:
            # Imported here: its replicas talk over ZeroMQ, which one engine does not need.
            from parallm.engine.data_parallel import DataParallelEngine

            self.engine = DataParallelEngine(config, model_config)
        else:
            self.engine = LLMEngine(config, model_config)
        if chat_template:
            if self.engine.tokenizer is None:
                raise ValueError("chat_template needs a tokenizer, and this engine has none")
            self.engine.tokenizer.chat_template = chat_template
        self._ids = itertools.count()
        logger.info(self.engine.summary())

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def close(self) -> None:
        """Free the engine: its device memory (weights, KV cache, CUDA graphs) at once, so
        that the next ``LLM`` in this process gets it, and the worker processes of a
        tensor-parallel or data-parallel engine (``tensor_parallel_size > 1``,
        ``data_parallel_size > 1``; they also stop at interpreter exit). The LLM cannot
        generate afterwards."""
        self.engine.close()

    def reset_prefix_cache(self) -> None:
        """Forget the cached prompt prefixes that no request holds (every replica's, with
        ``data_parallel_size > 1``), so that later prompts are computed afresh; benchmarks
        call it between a warm-up and the timed run."""
        self.engine.reset_prefix_cache()

    def start_profile(self) -> None:
        """Record the engine's steps until ``stop_profile`` (vLLM's name; the LLM built with
        ``profiler_config={"profiler": "torch", "torch_profiler_dir": DIR}``)."""
        self._local_engine("start_profile").start_profile()

    def stop_profile(self) -> str:
        """Stop recording and write the profile under ``torch_profiler_dir``; the trace's
        path (the table of kernels and ops is beside it, ending in ``.txt``)."""
        return self._local_engine("stop_profile").stop_profile()

    def _local_engine(self, what: str) -> LLMEngine:
        if not isinstance(self.engine, LLMEngine):
            raise ValueError(
                f"{what} profiles an engine in this process: not with data_parallel_size > 1 "
                "or engine_process=True (profile those through parallm serve's /start_profile)"
            )
        return self.engine

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """One ``RequestOutput`` per prompt, in order. Bad input raises before anything runs."""
        batch = _as_batch(prompts)
        params = _params_for(batch, sampling_params)
        encoded = [self._encode(p) for p in batch]
        for ids, _ in encoded:
            self.engine.validate_prompt(ids)
        for sp in params:
            self.engine.validate_params(sp)
        request_ids = [str(next(self._ids)) for _ in batch]
        try:
            for rid, (ids, text), sp in zip(request_ids, encoded, params, strict=True):
                self.engine.add_request(rid, ids, sp, prompt=text)
            finished = self._run(request_ids, use_tqdm)
        except BaseException:
            for rid in request_ids:
                self.engine.abort_request(rid)
            raise
        return [finished[rid] for rid in request_ids]

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then generate."""
        if not messages:
            raise ValueError("messages must not be empty")
        tokenizer = self._require_tokenizer("chat")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        for conversation in conversations:
            check_messages(conversation)
        prompts = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=add_generation_prompt,
                chat_template=chat_template,
            )  # fmt: skip
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            prompts.append({"prompt_token_ids": ids, "prompt": text})
        return self.generate(prompts, sampling_params, use_tqdm)

    def stream(
        self, prompt: PromptType, params: SamplingParams | None = None
    ) -> Iterator[RequestOutput]:
        """Yield deltas (new text and token ids) of one request as they are produced."""
        (ids, text), sp = self._encode(prompt), params or SamplingParams()
        rid = str(next(self._ids))
        self.engine.add_request(rid, ids, sp, prompt=text, stream=True)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort_request(rid)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> dict[str, RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Generating", disable=not use_tqdm, unit="req")
        generated = 0
        with bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.error is not None:
                        raise RuntimeError(f"request {out.request_id} failed: {out.error}")
                    if out.finished:
                        finished[out.request_id] = out
                        generated += sum(len(c.token_ids) for c in out.outputs)
                        bar.update(1)
                        rate = generated / max(bar.format_dict["elapsed"], 1e-9)
                        bar.set_postfix_str(f"{rate:.0f} out tok/s")
        return finished

    def _encode(self, prompt: PromptType) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            return self._require_tokenizer("a text prompt")(prompt)["input_ids"], prompt
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return list(prompt["prompt_token_ids"]), prompt.get("prompt")
            if "prompt" in prompt:
                return self._encode(prompt["prompt"])
            raise ValueError(
                f"prompt dict needs 'prompt' or 'prompt_token_ids', got {sorted(prompt)}"
            )
        if isinstance(prompt, list):
            return list(prompt), None
        raise ValueError(
            f"prompt must be a str, a list of token ids or a dict, got {type(prompt).__name__}"
        )

    def _require_tokenizer(self, what: str) -> Any:
        if self.engine.tokenizer is None:
            raise ValueError(
                f"{what} needs a tokenizer, and this engine has none (skip_tokenizer_init=True "
                "or no tokenizer files): pass prompts as token ids"
            )
        return self.engine.tokenizer


def _as_batch(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    if isinstance(prompts, str | dict):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    if not prompts:
        raise ValueError("prompts must not be empty")
    return prompts


def _params_for(
    batch: list[PromptType], params: SamplingParams | Sequence[SamplingParams] | None
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * len(batch)
    if isinstance(params, SamplingParams):
        return [params] * len(batch)
    params = list(params)
    if len(params) != len(batch):
        raise ValueError(
            f"sampling_params has {len(params)} entries for {len(batch)} prompts; "
            "pass one SamplingParams or one per prompt"
        )
    for p in params:
        if not isinstance(p, SamplingParams):
            raise ValueError(
                f"sampling_params entries must be SamplingParams, got {type(p).__name__}"
            )
    return params
