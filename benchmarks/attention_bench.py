"""Benchmark the paged Triton attention kernels (needs a CUDA GPU).

Checks each case against the kernels' PyTorch twins in float64 first, then times it with
``triton.testing.do_bench`` (median; replaying a CUDA graph unless the column says eager) and
prints achieved bandwidth (K/V read + q + out bytes) next to torch's
``scaled_dot_product_attention`` on the same data gathered into contiguous tensors.

    python benchmarks/attention_bench.py [--quick] [--rows-only] [--dtype bf16] [--out results.json]

The "rows" kind times the decode rows of a captured mixed step (engine/mixed_graph.py) three
ways on the same data: the decode kernel, and the prefill kernel's tile-table launch at its
smallest row tile (``split_prefill_tiles``, what a mixed graph runs them with) and at a
512-token step's tile (before that split): how much a mixed step's decode rows pay for not
being a decode step.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parallm.kernels.paged_decode import decode_num_splits, paged_decode_attention  # noqa: E402
from parallm.kernels.paged_prefill import (  # noqa: E402
    paged_prefill_attention,
    prefill_tiles,
    prefill_tokens_per_tile,
)
from parallm.kernels.reference import paged_prefill_attention_ref  # noqa: E402

MODELS = {"llama-3.2-1b": (32, 8, 64), "llama-3.1-8b": (32, 8, 128)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
BLOCK_SIZE = 16
# Prefill batches as (q_len, seq_len) per sequence.
PREFILL_BATCHES = {
    "1x2048": [(2048, 2048)],
    "8x512": [(512, 512)] * 8,
    "4x512+1536prefix": [(512, 2048)] * 4,
    "mixed 4x256+60 decode@1k": [(256, 256)] * 4 + [(1, 1024)] * 60,
    # The serving trace's long prompt beside the decoding batch (the 8B's longest steps).
    "1x3521": [(3521, 3521)],
    "mixed 3521+64 decode@1k": [(3521, 3521)] + [(1, 1024)] * 64,
}
# Decode rows of a mixed step as (batch, context), on these shapes (Qwen3-0.6B: 2 query heads a
# KV head, the one mixed row that trails vLLM's, RESULTS sixteenth session).
ROW_CASES = [(64, 1024), (128, 1024), (128, 2048)]
ROW_MODELS = {"qwen3-0.6b": (16, 8, 128), **MODELS}


@dataclass
class Result:
    kind: str
    model: str
    case: str
    ms: float
    gbps: float
    max_rel_err: float
    splits: int = 1
    ms_eager: float | None = None
    ms_sdpa: float | None = None
    gbps_sdpa: float | None = None
    tflops: float | None = None


def make_cache(lens, heads, dtype, device="cuda", seed=0):
    """Random paged cache with a shuffled block order, for (q_len, seq_len) sequences."""
    num_heads, num_kv_heads, head_dim = heads
    gen = torch.Generator(device).manual_seed(seed)
    pages = [math.ceil(s / BLOCK_SIZE) for _, s in lens]
    num_blocks = sum(pages) + 1
    perm = torch.randperm(num_blocks - 1, device=device, generator=gen).int() + 1
    tables = torch.zeros(len(lens), max(pages), dtype=torch.int32, device=device)
    offset = 0
    for b, n in enumerate(pages):
        tables[b, :n] = perm[offset : offset + n]
        offset += n
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    v_cache = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    q_lens = torch.tensor([q for q, _ in lens], device=device)
    qsl = torch.zeros(len(lens) + 1, dtype=torch.int32, device=device)
    qsl[1:] = q_lens.cumsum(0)
    q = torch.randn(int(q_lens.sum()), num_heads, head_dim, device=device, dtype=dtype)
    seq_lens = torch.tensor([s for _, s in lens], dtype=torch.int32, device=device)
    return q, k_cache, v_cache, tables, qsl, seq_lens


def gather_context(k_cache, tables, b, seq_len):
    """[seq_len, Hkv, D] keys (or values) of sequence b."""
    n = math.ceil(seq_len / BLOCK_SIZE)
    return k_cache[tables[b, :n].long()].flatten(0, 1)[:seq_len]


def reference(q, k_cache, v_cache, tables, qsl, seq_lens, scale, max_seqs):
    """The twin's float64 attention of the first ``max_seqs`` sequences; returns their rows
    (a float64 q makes the twin compute in float64)."""
    n = min(max_seqs, len(seq_lens))
    q64 = q[: int(qsl[n])].double()
    return paged_prefill_attention_ref(
        q64, k_cache, v_cache, tables[:n], qsl[: n + 1], seq_lens[:n], 0, scale
    )


def rel_err(out, ref):
    return ((out[: ref.shape[0]].double() - ref).norm() / ref.norm()).item()


def bench(fn, graph: bool = True) -> float:
    """Median ms per call; through a CUDA graph by default, so Python launch cost is left out
    (as in the engine's captured decode), with L2 flushed before each replay by do_bench."""
    if not graph:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    torch.cuda.synchronize()
    cuda_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(cuda_graph):
        fn()
    return triton.testing.do_bench(cuda_graph.replay, warmup=25, rep=100, return_mode="median")


def attention_bytes(q, k_cache, seq_lens):
    kv = int(seq_lens.sum()) * k_cache.shape[2] * k_cache.shape[3] * 2
    return (kv + 2 * q.numel()) * q.element_size()


def sdpa_inputs(q, k_cache, v_cache, tables, seq_lens, q_len):
    """Contiguous [B, H, L, D] tensors; only for batches of one shared length."""
    batch, seq_len = len(seq_lens), int(seq_lens[0])
    k = torch.stack([gather_context(k_cache, tables, b, seq_len) for b in range(batch)])
    v = torch.stack([gather_context(v_cache, tables, b, seq_len) for b in range(batch)])
    qb = q.view(batch, q_len, q.shape[1], q.shape[2])
    return qb.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def time_sdpa(q, k, v, causal):
    def run():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    try:
        return bench(run)
    except RuntimeError as exc:  # no kernel for this shape/backend
        print(f"  sdpa failed: {exc}", file=sys.stderr)
        return None


def bench_decode(model, heads, batch, ctx, dtype):
    lens = [(1, ctx)] * batch
    q, k_cache, v_cache, tables, qsl, seq_lens = make_cache(lens, heads, dtype)
    scale = heads[2] ** -0.5
    args = (q, k_cache, v_cache, tables, seq_lens, scale, ctx)
    err = rel_err(
        paged_decode_attention(*args),
        reference(q, k_cache, v_cache, tables, qsl, seq_lens, scale, 8),
    )
    ms = bench(lambda: paged_decode_attention(*args))
    ms_eager = bench(lambda: paged_decode_attention(*args), graph=False)
    nbytes = attention_bytes(q, k_cache, seq_lens)
    ms_sdpa = time_sdpa(*sdpa_inputs(q, k_cache, v_cache, tables, seq_lens, 1), causal=False)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    return Result(
        kind="decode",
        model=model,
        case=f"B={batch} ctx={ctx}",
        ms=ms,
        gbps=nbytes / ms / 1e6,
        max_rel_err=err,
        splits=decode_num_splits(batch, heads[1], ctx, sms),
        ms_eager=ms_eager,
        ms_sdpa=ms_sdpa,
        gbps_sdpa=nbytes / ms_sdpa / 1e6 if ms_sdpa else None,
    )


def bench_decode_rows(model, heads, batch, ctx, dtype):
    """The same ``batch`` one-token queries at context ``ctx`` through the decode kernel and
    through the prefill kernel's tile-table launch at two tiles (module docstring)."""
    lens = [(1, ctx)] * batch
    q, k_cache, v_cache, tables, qsl, seq_lens = make_cache(lens, heads, dtype)
    scale = heads[2] ** -0.5
    ref = reference(q, k_cache, v_cache, tables, qsl, seq_lens, scale, 8)
    paths = {"decode": lambda: paged_decode_attention(q, k_cache, v_cache, tables, seq_lens,
                                                      scale, ctx)}  # fmt: skip
    for bound in (1, 512):
        per_tile = prefill_tokens_per_tile(heads[2], heads[0], heads[1], dtype, q.device, bound)
        tiles = torch.from_numpy(prefill_tiles([1] * batch, per_tile, batch)).to(q.device)
        paths[f"tile@{bound}"] = partial(paged_prefill_attention, q, k_cache, v_cache, tables,
                                         qsl, seq_lens, bound, scale, tiles=tiles)  # fmt: skip
    nbytes = attention_bytes(q, k_cache, seq_lens)
    results = []
    for label, fn in paths.items():
        err = rel_err(fn(), ref)
        ms = bench(fn)
        results.append(Result(kind="rows", model=model, case=f"B={batch} ctx={ctx} {label}",
                              ms=ms, gbps=nbytes / ms / 1e6, max_rel_err=err))  # fmt: skip
    return results


def causal_flops(lens, heads):
    num_heads, _, head_dim = heads
    visible = sum(q * (s - q) + q * (q + 1) // 2 for q, s in lens)
    return 4 * num_heads * head_dim * visible


def bench_prefill(model, heads, name, lens, dtype):
    q, k_cache, v_cache, tables, qsl, seq_lens = make_cache(lens, heads, dtype)
    scale = heads[2] ** -0.5
    max_q = max(q_len for q_len, _ in lens)
    args = (q, k_cache, v_cache, tables, qsl, seq_lens, max_q, scale)
    ref = reference(q, k_cache, v_cache, tables, qsl, seq_lens, scale, 4)
    err = rel_err(paged_prefill_attention(*args), ref)
    ms = bench(lambda: paged_prefill_attention(*args))
    ms_eager = bench(lambda: paged_prefill_attention(*args), graph=False)
    nbytes = attention_bytes(q, k_cache, seq_lens)
    ms_sdpa = None
    if len({(q_len, s) for q_len, s in lens}) == 1 and lens[0][0] == lens[0][1]:
        ms_sdpa = time_sdpa(*sdpa_inputs(q, k_cache, v_cache, tables, seq_lens, max_q), True)
    return Result(
        kind="prefill",
        model=model,
        case=name,
        ms=ms,
        gbps=nbytes / ms / 1e6,
        max_rel_err=err,
        ms_eager=ms_eager,
        ms_sdpa=ms_sdpa,
        gbps_sdpa=nbytes / ms_sdpa / 1e6 if ms_sdpa else None,
        tflops=causal_flops(lens, heads) / ms / 1e9,
    )


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_table(results):
    head = f"{'kind':8} {'model':13} {'case':26} {'ms':>8} {'GB/s':>7} {'TFLOP/s':>8}"
    head += f" {'splits':>6} {'ms eager':>8} {'ms sdpa':>8} {'GB/s sdpa':>9} {'rel err':>8}"
    print(head)
    for r in results:
        print(
            f"{r.kind:8} {r.model:13} {r.case:26} {r.ms:8.4f} {r.gbps:7.0f} {fmt(r.tflops, '8.1f')}"
            f" {r.splits:6d} {fmt(r.ms_eager, '8.4f')} {fmt(r.ms_sdpa, '8.4f')}"
            f" {fmt(r.gbps_sdpa, '9.0f')} {r.max_rel_err:8.1e}"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--rows-only", action="store_true",
                        help="only the decode rows of a mixed step (the rows kind)")  # fmt: skip
    parser.add_argument("--prefill-only", action="store_true",
                        help="only the prefill kernel's batches (the prefill kind)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="write results as JSON here")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    if not torch.cuda.is_available():
        print("attention_bench needs a CUDA GPU", file=sys.stderr)
        return 1
    dtype = DTYPES[args.dtype]
    batches, contexts = (
        ([1, 32], [512, 8192]) if args.quick else ([1, 8, 32, 128], [512, 2048, 8192])
    )
    rows = {} if args.prefill_only else ROW_MODELS
    results = [r for model, heads in rows.items() for batch, ctx in ROW_CASES
               for r in bench_decode_rows(model, heads, batch, ctx, dtype)]  # fmt: skip
    for model, heads in {} if args.rows_only else MODELS.items():
        for batch in [] if args.prefill_only else batches:
            for ctx in contexts:
                results.append(bench_decode(model, heads, batch, ctx, dtype))
        for name, lens in PREFILL_BATCHES.items():
            results.append(bench_prefill(model, heads, name, lens, dtype))
    print(f"device: {torch.cuda.get_device_name()}, dtype {args.dtype}, block_size {BLOCK_SIZE}")
    print_table(results)
    worst = max(r.max_rel_err for r in results)
    if args.out:
        payload = {"device": torch.cuda.get_device_name(), "dtype": args.dtype}
        payload["results"] = [asdict(r) for r in results]
        args.out.write_text(json.dumps(payload, indent=2))
    if worst > 1e-2:
        print(f"FAILED: max relative error {worst:.2e} > 1e-2", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
