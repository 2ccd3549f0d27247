"""``parallm bench throughput``: the standard offline workload, optionally against transformers.

256 requests, prompt and output lengths uniform in [100, 1024], random token ids, EOS ignored,
seed 0: the workload nano-vllm publishes. With ``--data-parallel-size N`` the same requests go
to N engine replicas (one process and one GPU, or ``--tensor-parallel-size`` GPUs, each), and
the timing covers the same span as with one engine: from submitting the requests to the last
one's output in this process.
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

import torch

from parallm.bench import vllm_peer
from parallm.bench.common import environment, print_table, random_prompts, write_json


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-requests", type=int, default=256, help="requests in the workload")
    p.add_argument("--min-len", type=int, default=100, help="shortest prompt and output")
    p.add_argument("--max-len", type=int, default=1024, help="longest prompt and output")
    p.add_argument("--workload-seed", type=int, default=0, help="seed of lengths and token ids")
    p.add_argument(
        "--compare-hf",
        action="store_true",
        help="also run transformers' generate_batch on the same prompts (mean output length each)",
    )
    p.add_argument(
        "--engine-process",
        action="store_true",
        help="step the engine in a process of its own, as the server does (LLM(engine_process="
        "True)), to set the engine process's offline speed beside the in-process engine's",
    )
    vllm_peer.add_args(p, default_configs=",".join(vllm_peer.CONFIGS))


def workload(args: argparse.Namespace, vocab_size: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(args.workload_seed)
    n = args.num_requests
    in_lens = [rng.randint(args.min_len, args.max_len) for _ in range(n)]
    out_lens = [rng.randint(args.min_len, args.max_len) for _ in range(n)]
    return random_prompts(n, in_lens, vocab_size, args.workload_seed), out_lens


def run_parallm(llm: Any, prompts: list[list[int]], out_lens: list[int]) -> dict[str, Any]:
    from parallm import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in out_lens]
    batch = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(batch[:8], params[:8], use_tqdm=False)  # warm up kernels outside the timing
    llm.reset_prefix_cache()  # every replica's: the warm-up's prompts must not help the run
    # Replicas (and an engine process) run in their own processes and send outputs only once
    # their step is done, so this process has no GPU work to wait for, nor GPU memory to report.
    replicas = llm.engine.config.data_parallel_size
    in_process = replicas == 1 and not llm.engine.config.engine_process
    if in_process and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    routed_before = [] if in_process else list(llm.engine.num_requests_routed)
    start = time.perf_counter()
    outs = llm.generate(batch, params, use_tqdm=True)
    seconds = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    row = _rates("parallm", len(prompts), sum(map(len, prompts)), generated, seconds, in_process)
    row["engine_process"] = llm.engine.config.engine_process
    if replicas > 1:
        row["data_parallel_size"] = replicas
        row["requests_per_replica"] = [
            after - before
            for after, before in zip(llm.engine.num_requests_routed, routed_before, strict=True)
        ]
    return row


def run_hf(model_path: str | None, config_path: str | None, dtype: torch.dtype,
           prompts: list[list[int]], out_len: int) -> dict[str, Any]:  # fmt: skip
    """transformers' continuous batching on the same prompts, each generating ``out_len``."""
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if model_path is not None:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    else:
        cfg = transformers.AutoConfig.from_pretrained(config_path)
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model = model.to(device).eval()
    gen = transformers.GenerationConfig(
        max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False, eos_token_id=None,
        pad_token_id=0,
    )  # fmt: skip
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    results = model.generate_batch(inputs=prompts, generation_config=gen, progress_bar=True)
    seconds = time.perf_counter() - start
    generated = sum(len(r.generated_tokens) for r in results.values())
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return _rates(
        "transformers generate_batch", len(prompts), sum(map(len, prompts)), generated, seconds
    )


def _rates(
    name: str, n: int, prompt_tokens: int, generated: int, seconds: float,
    gpu_memory_here: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Rates of one timed run; ``gpu_memory_here``: the run's GPU memory is this process's."""
    here = gpu_memory_here and torch.cuda.is_available()
    peak = torch.cuda.max_memory_allocated() / 2**30 if here else None
    return {
        "engine": name, "requests": n, "seconds": seconds, "requests_per_s": n / seconds,
        "output_tokens": generated, "output_tokens_per_s": generated / seconds,
        "total_tokens_per_s": (prompt_tokens + generated) / seconds, "peak_gpu_mem_gib": peak,
    }  # fmt: skip


def run(args: argparse.Namespace, llm: Any) -> dict[str, Any]:
    engine = llm.engine
    prompts, out_lens = workload(args, engine.model_config.vocab_size)
    rows = [run_parallm(llm, prompts, out_lens)]
    if engine.config.speculative_config is not None:
        rows[0]["tokens_per_drafted_step"] = engine.spec_stats.mean_accepted_per_step
    summary = engine.summary()
    peer = vllm_peer.peer_model(engine, args) if args.compare_vllm else None
    llm.close()  # its memory and processes go, before transformers or vLLM runs
    if args.compare_hf:
        mean_out = round(sum(out_lens) / len(out_lens))
        hf = run_hf(args.model, args.config, _dtype(args.dtype), prompts, mean_out)
        rows.append(hf)
        rows[0]["speedup_vs_hf"] = rows[0]["output_tokens_per_s"] / hf["output_tokens_per_s"]
    if peer is not None:
        rows += vllm_peer.throughput_rows(peer, args.vllm_configs, prompts, out_lens)
        vllm_peer.add_speedups(rows, "output_tokens_per_s", higher_is_better=True)
    print(summary)
    columns = [
        ("engine", "engine", "s"), ("requests_per_s", "req/s", ".2f"),
        ("output_tokens_per_s", "out tok/s", ".0f"), ("total_tokens_per_s", "total tok/s", ".0f"),
        ("seconds", "seconds", ".1f"), ("peak_gpu_mem_gib", "peak GiB", ".1f"),
        ("speedup_vs_hf", "x HF", ".1f"),
    ]  # fmt: skip
    if peer is not None:
        columns.append(("parallm_speedup", "parallm x", ".2f"))
    if "tokens_per_drafted_step" in rows[0]:
        columns.append(("tokens_per_drafted_step", "tok/drafted step", ".2f"))
    print_table(rows, columns)
    payload = {"benchmark": "throughput", "env": environment(), "summary": summary,
               "args": vars(args) | {"func": None}, "results": rows}  # fmt: skip
    if peer is not None:
        payload["vllm"] = vllm_peer.describe(peer)
    write_json(args.out, payload)
    if args.plot is not None:
        title = f"{vllm_peer.model_name(args)}: {len(prompts)} requests, output tokens/s"
        vllm_peer.plot_throughput(rows, args.plot, title)
    return payload


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16}.get(name, torch.bfloat16)
