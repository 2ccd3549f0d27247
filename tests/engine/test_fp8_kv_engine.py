"""``kv_cache_dtype="fp8"`` (``--kv-cache-dtype fp8``): an e4m3 KV cache with per-layer
scales. The engine allocates it, plans twice a bf16 cache's blocks for the same bytes, says so
in its summary and reads back exactly what it stored; draft models and tensor-parallel ranks
cache fp8 too; the Triton kernels (interpreter on CPU) and the batch-1 chain give the
reference path's tokens; on the bundled trained model the held-out loss stays within 0.5%;
bad values are refused before loading."""

from __future__ import annotations

import argparse
import json
import textwrap

import pytest
import torch
from bundled_quality import CODE_PROMPTS, held_out_rows, needs_bundled
from interpreted_engine import run_interpreted

from parallm import LLM, SamplingParams
from parallm.bundled import BUNDLED_MODEL_DIR
from parallm.commands.engine_args import add_engine_args, engine_kwargs
from parallm.config import EngineConfig, resolve_kv_cache_dtype
from parallm.engine.runner import kv_bytes_per_block
from parallm.kernels.reference import dequantize_kv_ref, quantize_kv_ref
from parallm.layers import attention

# Prompts longer than 64 tokens prefill in chunks, each attending over the cached ones.
CPU_ENGINE = {"dtype": "float32", "device": "cpu", "kv_cache_memory": 4 << 20,
              "max_num_batched_tokens": 64, "enforce_eager": True,
              "max_model_len": 512}  # fmt: skip
NEW_TOKENS = 16
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


def _generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    batch = [{"prompt_token_ids": p} for p in prompts]
    return [list(o.outputs[0].token_ids) for o in llm.generate(batch, GREEDY, use_tqdm=False)]


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of the generated tokens equal to the other run's before their first difference."""
    return sum(map(_common_prefix, a, b)) / sum(map(len, a))


def _top_tokens(llm: LLM, prompts: list[list[int]], tokens: list[list[int]]) -> list[int]:
    """The engine's top next token at each position of ``tokens`` after each prompt, given
    the prompt and the tokens before it (``prompt_logprobs`` of prompt + tokens)."""
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    batch = [{"prompt_token_ids": p + t} for p, t in zip(prompts, tokens, strict=True)]
    outs = llm.generate(batch, params, use_tqdm=False)
    return [min(out.prompt_logprobs[i].items(), key=lambda item: item[1].rank)[0]
            for out, p, t in zip(outs, prompts, tokens, strict=True)
            for i in range(len(p), len(p) + len(t))]  # fmt: skip


def _same_top_token(a: LLM, b: LLM, prompts: list[list[int]], tokens: list[list[int]]) -> float:
    """Share of the positions of ``tokens`` where ``a`` and ``b`` pick the same top token."""
    x, y = _top_tokens(a, prompts, tokens), _top_tokens(b, prompts, tokens)
    return sum(i == j for i, j in zip(x, y, strict=True)) / len(x)


def _fake_quantized_store(monkeypatch) -> None:
    """The reference backend's store rounds k and v to e4m3 values but keeps a float cache:
    attention then reads exactly the values an fp8 cache dequantizes to (scales 1.0)."""
    write_kv = attention.write_kv

    def store(k, v, kv_cache, slots, kv_scale=None):
        one = torch.ones((), dtype=torch.float32)
        k, v = (dequantize_kv_ref(quantize_kv_ref(x, one), one, x.dtype) for x in (k, v))
        write_kv(k, v, kv_cache, slots, kv_scale)

    monkeypatch.setattr(attention, "write_kv", store)


@pytest.mark.parametrize("name", ["fp8", "fp8_e4m3"])
def test_fp8_cache_doubles_the_blocks_and_reads_back_what_it_stored(
    tiny_model_dir, prompts, monkeypatch, name
):
    path = str(tiny_model_dir("llama3"))
    plain = LLM(path, **CPU_ENGINE)
    fp8 = LLM(path, kv_cache_dtype=name, **CPU_ENGINE)
    runner = fp8.engine.runner
    assert {c.dtype for c in runner.kv_caches} == {torch.float8_e4m3fn}
    assert {c.dtype for c in plain.engine.runner.kv_caches} == {torch.float32}
    # One byte an element instead of four: the same kv_cache_memory holds 4x the blocks
    # (both caches also keep one scratch block).
    assert fp8.engine.kv.num_blocks + 1 == 4 * (plain.engine.kv.num_blocks + 1)
    assert "KV cache (float8_e4m3fn): " in fp8.engine.summary()
    assert f"= {fp8.engine.kv_capacity_tokens} tokens" in fp8.engine.summary()
    assert "KV cache (float32): " in plain.engine.summary()

    want, got = _generate(plain, prompts), _generate(fp8, prompts)
    assert want != got  # the cache does store e4m3: its rounding shows
    # These random models have sharp attention and close top logits, so one flipped greedy
    # pick sends a whole continuation elsewhere: measured 0.375 of the tokens before the first
    # difference. Given the same context (the float run's tokens), the fp8 engine's top token
    # is the float one's at 0.865 of the positions. The quality measure is the bundled trained
    # model's test below.
    same_context = _same_top_token(plain, fp8, prompts, want)
    print(f"fp8 KV greedy agreement with the float cache: {_agreement(want, got):.3f} free "
          f"running, {same_context:.3f} given the same context")  # fmt: skip
    assert same_context >= 0.6
    # The fp8 engine computes exactly what a float cache of e4m3-rounded values gives: the
    # cache stores, keeps and reads back each value as stored, through prefill, chunks and
    # decode. A fresh engine, so that no float block comes from its prefix cache.
    _fake_quantized_store(monkeypatch)
    assert _generate(LLM(path, **CPU_ENGINE), prompts) == got


def test_fp8_cache_halves_the_bytes_of_a_bf16_cache(tiny_model_dir):
    path = str(tiny_model_dir("qwen3"))
    bf16 = LLM(path, **{**CPU_ENGINE, "dtype": "bfloat16"})
    fp8 = LLM(path, kv_cache_dtype="fp8", **{**CPU_ENGINE, "dtype": "bfloat16"})
    assert fp8.engine.kv.num_blocks + 1 == 2 * (bf16.engine.kv.num_blocks + 1)
    out = fp8.generate([{"prompt_token_ids": [5, 6, 7]}], GREEDY, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == NEW_TOKENS


@pytest.mark.parametrize("bad", ["fp8_e5m2", "float16", "FP8", "int8"])
def test_other_kv_cache_dtypes_are_refused_before_loading(tmp_path, bad):
    missing = tmp_path / "no-such-model"  # loading it would fail with another message
    message = r"kv_cache_dtype must be one of \['auto', 'fp8', 'fp8_e4m3'\], got " + repr(bad)
    with pytest.raises(ValueError, match=message):
        LLM(str(missing), kv_cache_dtype=bad)
    with pytest.raises(ValueError, match=message):
        EngineConfig(kv_cache_dtype=bad)


def test_resolve_kv_cache_dtype():
    assert resolve_kv_cache_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert resolve_kv_cache_dtype("fp8", torch.bfloat16) == torch.float8_e4m3fn
    assert resolve_kv_cache_dtype("fp8_e4m3", torch.float32) == torch.float8_e4m3fn


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_engine_args(parser)
    return parser


def test_command_line_flag(capsys):
    for value in ("fp8", "fp8_e4m3", "auto"):
        args = _parser().parse_args(["--model", "m", "--kv-cache-dtype", value])
        assert engine_kwargs(args)["kv_cache_dtype"] == value
    assert engine_kwargs(_parser().parse_args(["--model", "m"]))["kv_cache_dtype"] == "auto"
    with pytest.raises(SystemExit):
        _parser().parse_args(["--model", "m", "--kv-cache-dtype", "fp8_e5m2"])
    assert "--kv-cache-dtype: invalid choice: 'fp8_e5m2'" in capsys.readouterr().err
    help_text = " ".join(_parser().format_help().split())
    assert "--kv-cache-dtype {auto,fp8,fp8_e4m3}" in help_text
    assert "(default: auto)" in help_text


def test_the_triton_backend_refuses_fp8_on_gpus_without_e4m3(monkeypatch):
    from parallm.layers.backends import check_kv_cache_dtype_support

    class Triton:
        name = "triton"

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match=r"compute capability >= 8.9 .* this GPU has 8.0"):
        check_kv_cache_dtype_support(Triton(), torch.float8_e4m3fn, torch.device("cuda"))
    check_kv_cache_dtype_support(Triton(), torch.bfloat16, torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_kv_cache_dtype_support(Triton(), torch.float8_e4m3fn, torch.device("cuda"))


@pytest.mark.parametrize("method", ["draft_model", "layer_skip"])
def test_a_draft_models_cache_is_fp8_too_and_drafting_stays_lossless(
    tiny_model_dir, prompts, method
):
    """The draft's cache takes the target's KV dtype, and the two share the budget by their
    fp8 bytes per block; the target's verification keeps the fp8 engine's own greedy tokens."""
    path = str(tiny_model_dir("qwen3"))
    if method == "draft_model":
        spec = {"method": method, "model": str(tiny_model_dir("qwen2")),
                "num_speculative_tokens": 3}  # fmt: skip
    else:
        spec = {"method": method, "num_layers": 1, "num_speculative_tokens": 3}
    budget = CPU_ENGINE["kv_cache_memory"]
    fp8 = LLM(path, kv_cache_dtype="fp8", **CPU_ENGINE)
    drafted = LLM(path, kv_cache_dtype="fp8", speculative_config=spec, **CPU_ENGINE)
    engine, draft = drafted.engine, drafted.engine.draft_model
    assert {c.dtype for c in draft.runner.kv_caches} == {torch.float8_e4m3fn}
    per_block = [kv_bytes_per_block(cfg, 16, torch.float8_e4m3fn)
                 for cfg in (engine.model_config, draft.model_cfg)]  # fmt: skip
    used = (engine.kv.num_blocks + 1) * sum(per_block)
    assert budget - 2 * sum(per_block) < used <= budget
    assert _generate(drafted, prompts) == _generate(fp8, prompts)
    assert engine.spec_stats.draft_tokens > 0


_TRITON_SCRIPT = textwrap.dedent(
    """
    import sys
    import triton_interpreter  # before triton: lists its builtins once (speed)
    import torch
    from interpreted_engine import assert_same_tokens_and_logprobs, use_one_row_chain
    from parallm import LLM, SamplingParams
    from parallm.layers.backends import TritonAttention

    def engine(triton):
        llm = LLM(sys.argv[1], device="cpu", max_model_len=128, kv_cache_dtype="fp8",
                  max_num_batched_tokens=32)
        if triton:  # what CUDA gets; the interpreter runs its kernels
            llm.engine.runner.backend = TritonAttention()
        return llm, llm.engine.runner

    prompts = [{"prompt_token_ids": [5 + i for i in range(n)]} for n in (1, 7, 40)]
    p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
    llm, runner = engine(triton=False)
    assert runner.kv_caches[0].dtype == torch.float8_e4m3fn
    ref, ref_caches = llm.generate(prompts, p, use_tqdm=False), runner.kv_caches
    llm, runner = engine(triton=True)
    triton = llm.generate(prompts, p, use_tqdm=False)
    # The kernels stored exactly the bytes the reference path stored, slot for slot.
    for a, b in zip(ref_caches, runner.kv_caches):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    llm, runner = engine(triton=True)
    # Batch-1 rows: the 1-token prompt's prefill and decodes, the 40-token one's decodes over
    # three blocks (the 7-token prompt, one block like the 1-token one, is left out here).
    rows = use_one_row_chain(runner)
    one_row = [llm.generate([prompts[i]], p, use_tqdm=False)[0] for i in (0, 2)]
    assert len(rows) >= 2 * 7, rows
    assert_same_tokens_and_logprobs(ref, triton)
    assert_same_tokens_and_logprobs([ref[0], ref[2]], one_row)
    print("fp8 triton ok")
    """
)


def test_triton_kernels_and_the_one_row_chain_match_the_reference_fp8_path(tiny_model_dir):
    """Under the Triton interpreter: the Triton backend (fused rotary+fp8 store, prefill over
    chunks, decode) and the batch-1 kernel chain give the reference backend's tokens and
    logprobs over an fp8 cache, and store the same cache bytes. A subprocess, because
    TRITON_INTERPRET must be set before triton is first imported."""
    pytest.importorskip("triton")
    out = run_interpreted(_TRITON_SCRIPT, str(tiny_model_dir("llama3")), timeout=600)
    assert "fp8 triton ok" in out


# --- quality on the bundled trained model ---------------------------------------------------

# Held-out text (bundled_quality.held_out_rows) in 512-token rows, scored
# through the engine's paged attention (prompt_logprobs), so every key and value the scores
# attend to comes from the KV cache. Measured: loss 4.493 float, fp8 +0.04%; greedy agreement
# over the first 16 tokens of the six prompts 0.89 before the first difference (over 64
# tokens: 0.77), and 0.99 of the top tokens given the float run's context (95 of 96). The loss
# bound is issue 17's quality target; the floors leave one more flip than measured.
LOSS_REL_BOUND = 0.005
GREEDY_AGREEMENT_FLOOR = 0.7
SAME_CONTEXT_FLOOR = 0.97


def _paged_held_out_loss(llm: LLM, rows: list[list[int]]) -> float:
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": r} for r in rows], params, use_tqdm=False)
    logprobs = [scores[token].logprob for out, row in zip(outs, rows, strict=True)
                for scores, token in zip(out.prompt_logprobs[1:], row[1:], strict=True)]  # fmt: skip
    return -sum(logprobs) / len(logprobs)


@needs_bundled
def test_bundled_model_with_fp8_kv_keeps_its_loss_and_greedy_tokens():
    engine = {**CPU_ENGINE, "kv_cache_memory": 32 << 20, "max_num_batched_tokens": 2048}
    plain = LLM(str(BUNDLED_MODEL_DIR), **engine)
    fp8 = LLM(str(BUNDLED_MODEL_DIR), kv_cache_dtype="fp8", **engine)
    rows = held_out_rows(plain.get_tokenizer())
    want, got = _paged_held_out_loss(plain, rows), _paged_held_out_loss(fp8, rows)
    prompts = [plain.get_tokenizer()(p)["input_ids"] for p in CODE_PROMPTS]
    float_tokens = _generate(plain, prompts)
    agreement = _agreement(float_tokens, _generate(fp8, prompts))
    same_context = _same_top_token(plain, fp8, prompts, float_tokens)
    print(f"bundled fp8 KV: held-out loss {want:.4f} -> {got:.4f} "
          f"({(got / want - 1) * 100:+.3f}%), greedy agreement {agreement:.2f} free running, "
          f"{same_context:.2f} given the same context")  # fmt: skip
    assert got != want  # the scores did go through the fp8 cache
    assert abs(got / want - 1) <= LOSS_REL_BOUND
    assert agreement >= GREEDY_AGREEMENT_FLOOR
    assert same_context >= SAME_CONTEXT_FLOOR


def test_tensor_parallel_ranks_cache_fp8_like_one_rank(tiny_model_dir, prompts):
    """Each rank's cache of its KV heads is fp8 (the cache config travels to the workers):
    two ranks give one rank's fp8 tokens and logprobs."""
    path = str(tiny_model_dir("qwen3"))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
    batch = [{"prompt_token_ids": p} for p in prompts[:3]]

    def run(llm: LLM) -> tuple[list, list]:
        outs = [o.outputs[0] for o in llm.generate(batch, params, use_tqdm=False)]
        logprobs = [lp[t].logprob for o in outs
                    for t, lp in zip(o.token_ids, o.logprobs, strict=True)]  # fmt: skip
        return [o.token_ids for o in outs], logprobs

    want_tokens, want_logprobs = run(LLM(path, kv_cache_dtype="fp8", **CPU_ENGINE))
    plain_tokens, plain_logprobs = run(LLM(path, **CPU_ENGINE))
    llm = LLM(path, kv_cache_dtype="fp8", tensor_parallel_size=2, **CPU_ENGINE)
    try:
        assert llm.engine.runner.kv_caches[0].dtype == torch.float8_e4m3fn
        tokens, logprobs = run(llm)
    finally:
        llm.close()
    assert tokens == want_tokens
    assert logprobs == pytest.approx(want_logprobs, abs=1e-4)
    # The fp8 rounding moves the logprobs by more than that: a float cache anywhere would show.
    assert plain_logprobs != pytest.approx(want_logprobs, abs=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fused", [False, True])
def test_triton_and_cuda_graphs_over_fp8_give_the_reference_tokens(tiny_model_dir, prompts, fused):
    """On CUDA (compute capability 8.9+): Triton attention storing and reading e4m3, CUDA
    graphs (batch 1 through the one-row chain when fused) give the eager reference backend's
    greedy tokens over an fp8 cache, on float32 weights; a bf16 model's fp8 cache holds twice
    the tokens of its bf16 cache."""
    path = str(tiny_model_dir("llama3"))
    common = {"dtype": "float32", "device": "cuda", "kv_cache_memory": 64 << 20,
              "kv_cache_dtype": "fp8"}  # fmt: skip
    fast = LLM(path, fused_kernels=fused, **common)
    assert fast.engine.runner.backend.name == "triton" and fast.engine.runner.graphs is not None
    assert (fast.engine.runner.graphs.one_row is not None) == fused
    ref = LLM(path, attention_backend="reference", enforce_eager=True, **common)
    assert _generate(fast, prompts) == _generate(ref, prompts)
    alone = [prompts[-1]]
    assert _generate(fast, alone) == _generate(ref, alone)
    # 16 MiB: below the engine's cap on blocks (twice what max_num_seqs full sequences need).
    bf16 = {**common, "dtype": "bfloat16", "kv_cache_dtype": "auto", "kv_cache_memory": 16 << 20}
    auto_blocks = LLM(path, **bf16).engine.kv.num_blocks
    fp8_blocks = LLM(path, **{**bf16, "kv_cache_dtype": "fp8"}).engine.kv.num_blocks
    assert fp8_blocks + 1 == 2 * (auto_blocks + 1)


def test_latency_benchmark_counts_one_byte_per_cached_element(tiny_model_dir, tmp_path):
    """``bench latency``'s bytes per step (weights plus the KV read at the mean context)
    count the fp8 cache's bytes: a quarter of a float32 cache's."""
    from parallm.cli import main

    config = tiny_model_dir("llama3") / "config.json"
    rows = {}
    for dtype in ("auto", "fp8"):
        out = tmp_path / f"{dtype}.json"
        code = main(["bench", "latency", "--config", str(config), "--device", "cpu",
                     "--dtype", "float32", "--kv-cache-dtype", dtype, "--batch-sizes", "2",
                     "--input-len", "8", "--output-len", "4", "--iters", "1",
                     "--out", str(out)])  # fmt: skip
        assert code == 0
        result = json.loads(out.read_text())
        (row,) = result["results"]
        rows[dtype] = row["bytes_per_step"] - result["weight_bytes"]
    assert rows["auto"] > 0 and rows["fp8"] * 4 == rows["auto"]
