"""Command-line flags shared by every command that builds an engine."""

from __future__ import annotations

import argparse
from typing import Any

from parallm.config import KV_CACHE_DTYPES, EngineConfig
from parallm.engine.spec.config import DEFAULT_PROMPT_LOOKUP, IMPLEMENTED_METHODS, METHODS
from parallm.layers.quantization import QUANTIZATION_METHODS


def add_engine_args(parser: argparse.ArgumentParser, model_required: bool = False) -> None:
    """Flags for the model, precision, device and KV cache."""
    g = parser.add_argument_group("engine")
    g.add_argument(
        "--model",
        required=model_required,
        default=None,
        help="Hugging Face model directory (config.json, safetensors, tokenizer) or Hub id "
        "(e.g. Qwen/Qwen3-0.6B: from the cache, else downloaded unless HF_HUB_OFFLINE=1)",
    )
    g.add_argument(
        "--revision",
        default=None,
        help="for a Hugging Face Hub id: the branch, tag or commit to load (default: main)",
    )
    g.add_argument(
        "--download-dir",
        default=None,
        help="for a Hugging Face Hub id: the cache folder to look in and download to "
        "(default: the Hugging Face cache, $HF_HOME/hub)",
    )
    g.add_argument(
        "--skip-tokenizer-init",
        action="store_true",
        help="load no tokenizer: prompts must be token ids, outputs carry token ids and no text",
    )
    g.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer directory or Hugging Face Hub id, when it is not the model's "
        "(unset: the model's)",
    )
    g.add_argument(
        "--chat-template",
        default=None,
        help="chat template for chat requests and --chat: a file, or the Jinja template itself "
        "(unset: the tokenizer's)",
    )
    g.add_argument(
        "--config",
        default=None,
        help="a config.json alone; implies --load-format dummy (random weights)",
    )
    g.add_argument(
        "--load-format",
        default="auto",
        choices=["auto", "safetensors", "dummy"],
        help="where weights come from; 'dummy' makes random ones (benchmarks)",
    )
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weight and activation dtype; auto = checkpoint dtype on CUDA, float32 on CPU",
    )
    g.add_argument(
        "--quantization",
        default=None,
        choices=list(QUANTIZATION_METHODS),
        help="quantize the checkpoint's weights at load: fp8 (e4m3) or int8, one scale per output "
        "channel, every linear layer but the LM head (fp8 GEMMs on fp8 tensor cores, compute "
        "capability 8.9+; batch-1 decode reads the quantized weights). A checkpoint stored "
        "quantized (config.json quantization_config: fp8 or compressed-tensors, 8-bit) loads "
        "as it is stored without this flag (default: None, weights stay in --dtype or as the "
        "checkpoint stores them)",
    )
    g.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=list(KV_CACHE_DTYPES),
        help="KV cache element type: auto = the model's dtype; fp8 (= fp8_e4m3) stores keys and "
        "values as float8 e4m3 with per-layer scales (1.0), twice the tokens of a bf16 cache "
        "in the same memory",
    )
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument(
        "-tp",
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="shard the model over this many ranks, one process each (Megatron style): one GPU "
        "per rank with NCCL on CUDA, gloo on the CPU (async scheduling off)",
    )
    g.add_argument(
        "-dp",
        "--data-parallel-size",
        type=int,
        default=1,
        help="run this many engine replicas, one process each (each of --tensor-parallel-size "
        "ranks; on GPUs replica i takes GPUs i*tp..(i+1)*tp-1), and send each request to the "
        "one that caches the longest prefix of it, else the least loaded (generate, serve "
        "and bench throughput; on CUDA it may be at most the GPUs visible / tp)",
    )
    g.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="context limit in tokens (unset: the model's)",
    )
    g.add_argument(
        "--kv-cache-memory",
        type=int,
        default=None,
        help="KV cache size in bytes (overrides --gpu-memory-utilization; on CPU the default "
        "is 1 GiB); the whole cache is allocated and zero-filled at start",
    )
    g.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="fraction of the GPU that weights, activations and KV cache may use",
    )
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    g.add_argument(
        "--max-num-seqs",
        type=int,
        default=None,
        help="most sequences in one step (default: 1024 on a GPU of 70 GiB or more other than "
        "an A100, as vLLM's; 256 elsewhere)",
    )
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=8192,
        help="token budget of one step (prompt chunks + decodes)",
    )
    _add_switch(g, "--enable-prefix-caching", "--no-prefix-caching", "automatic prefix caching")
    _add_switch(
        g, "--enable-chunked-prefill", "--no-chunked-prefill",
        "chunked prefill (off: steps schedule whole prompts only)",
    )  # fmt: skip
    g.add_argument(
        "--attention-backend",
        default="auto",
        choices=["auto", "reference", "triton"],
        help="attention kernels: triton on CUDA, reference elsewhere",
    )
    g.add_argument("--enforce-eager", action="store_true", help="do not capture CUDA graphs")
    g.add_argument(
        "--cudagraph-capture-sizes",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="batch sizes of the decode steps' CUDA graphs (vLLM's flag): a decode step of B "
        "sequences replays the smallest graph of at least B; sizes above --max-num-seqs are "
        "not captured (unset: " + " ".join(map(str, EngineConfig.cuda_graph_sizes)) + ")",
    )
    g.add_argument(
        "--fused-kernels",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Triton RMSNorm+residual, rotary+KV-store and SiLU-mul kernels, and for one-token "
        "steps GEMVs with the norm or SiLU-mul fused in (unset: on for CUDA)",
    )
    g.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="overlap a decode step's host work with the next step's GPU work (unset: on for "
        "CUDA); with --speculative-config only steps above its disable_by_batch_size overlap",
    )
    g.add_argument("--seed", type=int, default=0, help="seed for dummy weights and sampling")
    g.add_argument(
        "--speculative-config",
        default=None,
        metavar="JSON",
        help="speculative decoding, vLLM's keys as a JSON object: method "
        f"({', '.join(METHODS)}; implemented: {', '.join(IMPLEMENTED_METHODS)}), "
        "num_speculative_tokens, prompt_lookup_min/prompt_lookup_max "
        f"(ngram, default {DEFAULT_PROMPT_LOOKUP}), prompt_lookup_history_tokens (ngram: a "
        "ring of that many tokens of finished requests to draft from where a sequence's own "
        "tokens give nothing; default 65536, 0: off), prompt_lookup_datastore (ngram: a dataset "
        "folder that parallm train prepared with the target's tokenizer, whose training "
        "split is drafted from after that ring), model (draft_model; medusa: the heads "
        "folder), num_layers (layer_skip), speculative_token_tree (medusa: index paths such as "
        '"[(0,), (0, 0), (1,)]" or "chain"; unset: a sparse tree), '
        "disable_by_batch_size (no drafts in steps with more running sequences), "
        "min_tokens_per_step (a request whose recent drafted steps emitted fewer tokens on "
        'average stops drafting for a while; "auto": the break-even the engine measures); e.g. '
        '\'{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}\' '
        "(unset: off)",
    )

    g.add_argument(
        "--profiler-config",
        default=None,
        metavar="JSON",
        help="vLLM's profiler_config as a JSON object: profiler (torch), torch_profiler_dir "
        "(where traces go), torch_profiler_record_shapes (default false), "
        "torch_profiler_with_stack (default false), torch_profiler_use_gzip (default true); "
        "parallm serve then records the engine's steps between POST /start_profile and POST "
        '/stop_profile, e.g. \'{"profiler": "torch", "torch_profiler_dir": "/tmp/prof"}\' '
        "(unset: off)",
    )


def _add_switch(g: argparse._ArgumentGroup, flag: str, old_off_flag: str, what: str) -> None:
    """``--enable-X/--no-enable-X`` (vLLM's spelling), and the older ``--no-X`` as an alias."""
    dest = flag.removeprefix("--").replace("-", "_")
    g.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=True,
                   help=what)  # fmt: skip
    g.add_argument(old_off_flag, dest=dest, action="store_false", default=argparse.SUPPRESS,
                   help=f"same as --no-{flag.removeprefix('--')}")  # fmt: skip


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for ``LLM(...)`` from parsed flags."""
    model = args.model
    load_format = args.load_format
    if args.config is not None:
        model, load_format = args.config, "dummy"
    if model is None:
        from parallm.bundled import default_model_path

        model = default_model_path()
    kwargs = dict(
        model=model, tokenizer=args.tokenizer, chat_template=args.chat_template,
        dtype=args.dtype, device=args.device, load_format=load_format,
        max_model_len=args.max_model_len, kv_cache_memory=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization, block_size=args.block_size,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=args.enable_prefix_caching,
        enable_chunked_prefill=args.enable_chunked_prefill,
        attention_backend=args.attention_backend, enforce_eager=args.enforce_eager, seed=args.seed,
        fused_kernels=args.fused_kernels, async_scheduling=args.async_scheduling,
        revision=args.revision,
        download_dir=args.download_dir, skip_tokenizer_init=args.skip_tokenizer_init,
        speculative_config=args.speculative_config,
        profiler_config=args.profiler_config,
        quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
        tensor_parallel_size=args.tensor_parallel_size,
        data_parallel_size=args.data_parallel_size,
        engine_process=getattr(args, "engine_process", False),  # bench throughput's flag
    )  # fmt: skip
    if args.cudagraph_capture_sizes is not None:  # unset: EngineConfig's default
        kwargs["cuda_graph_sizes"] = tuple(args.cudagraph_capture_sizes)
    EngineConfig.from_kwargs(**kwargs)  # fail on a bad name before loading anything
    _check_data_parallel_command(args)
    return kwargs


# Where N replicas mean something: each request runs on one of them.
_DATA_PARALLEL_COMMANDS = ("generate", "serve", "bench throughput")


def _check_data_parallel_command(args: argparse.Namespace) -> None:
    n = args.data_parallel_size
    if n == 1:
        return
    names = (getattr(args, "command", None), getattr(args, "bench", None))
    command = " ".join(name for name in names if name)
    if command not in _DATA_PARALLEL_COMMANDS:
        allowed = ", ".join(f"`parallm {c}`" for c in _DATA_PARALLEL_COMMANDS)
        why = ""
        if command == "bench latency":
            why = (
                ": bench latency times one engine's steps at fixed batch sizes, and replicas "
                "run separate batches, so there is no latency of N replicas (measure them "
                "with `parallm bench throughput`)"
            )
        raise ValueError(
            f"--data-parallel-size above 1 works with {allowed} (and LLM(...)) only, got {n} "
            f"for `parallm {command}`{why}"
        )
    if getattr(args, "compare_hf", False):
        raise ValueError(
            f"--compare-hf runs transformers on one device, so with --data-parallel-size {n} "
            f"its x HF column would set {n} replicas against it: drop one of the two flags"
        )
