"""GPU paths against the reference: Triton attention + CUDA graphs, and transformers in bf16."""

from __future__ import annotations

import pytest
import torch
from arrivals import run_arrivals
from transformers import AutoModelForCausalLM, GenerationConfig

from parallm import LLM, SamplingParams

pytestmark = pytest.mark.gpu

NEW_TOKENS = 32


def _greedy(llm: LLM, prompts: list[list[int]]) -> tuple[list[list[int]], list[list[float]]]:
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    tokens = [o.outputs[0].token_ids for o in outs]
    logprobs = [
        [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs, strict=True)]
        for o in outs
    ]
    return tokens, logprobs


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("arch", ["llama3", "qwen3", "qwen2"])
def test_fast_path_equals_reference_float32(tiny_model_dir, prompts, arch, fused):
    """Triton kernels + CUDA graphs give the reference path's tokens on the same fp32 weights:
    with logprobs (the sampler) and plain greedy (the argmax captured in the graph)."""
    path = str(tiny_model_dir(arch))
    common = dict(dtype="float32", device="cuda", kv_cache_memory=64 << 20)
    fast = LLM(path, fused_kernels=fused, **common)
    assert fast.engine.runner.backend.name == "triton"
    assert fast.engine.runner.graphs is not None
    ref = LLM(path, attention_backend="reference", enforce_eager=True, **common)
    fast_tokens, fast_lps = _greedy(fast, prompts)
    ref_tokens, ref_lps = _greedy(ref, prompts)
    assert fast_tokens == ref_tokens
    for a, b in zip(fast_lps, ref_lps, strict=True):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-3)
    plain = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    batch = [{"prompt_token_ids": p} for p in prompts]
    graphs = fast.engine.runner.graphs
    carried = graphs.num_carried_ids
    plain_tokens = [o.outputs[0].token_ids for o in fast.generate(batch, plain, use_tqdm=False)]
    assert plain_tokens == ref_tokens
    # Plain greedy continuations take their input ids from the previous replay's argmax.
    assert graphs.num_carried_ids > carried
    # One sequence (no padding rows): the graph also advances its positions, lengths and slots,
    # so most steps copy no inputs at all, and the tokens stay the reference's.
    skipped = graphs.num_skipped_copies
    one = [{"prompt_token_ids": prompts[-1]}]
    alone = fast.generate(one, plain, use_tqdm=False)[0].outputs[0].token_ids
    assert alone == ref.generate(one, plain, use_tqdm=False)[0].outputs[0].token_ids
    assert graphs.num_skipped_copies >= skipped + NEW_TOKENS // 2
    # The graphs' argmax hands its ids to the host in pinned memory, without a copy op.
    assert graphs.host_rings
    # Batch 1 runs the one-row kernel chain with the Triton kernels (not with qkv bias).
    assert (graphs.one_row is not None) == (fused and arch != "qwen2")


@pytest.mark.parametrize("arch", ["llama3", "qwen3", "qwen2"])
def test_one_sequence_fused_layers_equal_reference_float32(tiny_model_dir, prompts, arch,
                                                           monkeypatch):  # fmt: skip
    """The batch-1 graph runs the one-row kernel chain, norms and SiLU-mul inside the GEMVs
    (qwen2's q/k/v bias keeps it on the model's forward): the reference path's tokens, one
    sequence at a time."""
    from parallm.kernels import gemv

    calls = []  # whether each chained GEMV launched with PDL (Hopper: always)
    real = gemv.rms_norm_gemv
    monkeypatch.setattr(
        gemv, "rms_norm_gemv", lambda *a, **k: calls.append(k.get("pdl")) or real(*a, **k)
    )
    path = str(tiny_model_dir(arch))
    common = dict(dtype="float32", device="cuda", kv_cache_memory=64 << 20)
    fast = LLM(path, **common)
    ref = LLM(path, attention_backend="reference", enforce_eager=True, fused_kernels=False,
              **common)  # fmt: skip
    for prompt in prompts[:3]:
        fast_tokens, fast_lps = _greedy(fast, [prompt])
        ref_tokens, ref_lps = _greedy(ref, [prompt])
        assert fast_tokens == ref_tokens
        assert torch.allclose(torch.tensor(fast_lps[0]), torch.tensor(ref_lps[0]), atol=1e-3)
    assert (len(calls) > 0) == (arch != "qwen2")
    assert all(calls)


def test_fast_path_with_chunking_preemption_and_prefix_hits(tiny_model_dir, prompts):
    """Chunked prefill, preemption and prefix-cache hits through the Triton kernels."""
    path = str(tiny_model_dir("llama3"))
    ref = LLM(
        path, dtype="float32", device="cuda", attention_backend="reference", enforce_eager=True
    )
    shared = prompts[-1][:70]
    batch = [shared + p[:20] for p in prompts] + prompts
    ref_tokens, _ = _greedy(ref, batch)
    tight = LLM(path, dtype="float32", device="cuda", max_num_batched_tokens=48, max_model_len=256,
                kv_cache_memory=_kv_bytes(ref, num_blocks=40))  # fmt: skip
    tokens, _ = _greedy(tight, batch)
    assert tokens == ref_tokens
    stats = tight.engine.stats
    assert stats["num_preemptions"] > 0
    assert stats["num_prefix_cache_hit_tokens"] > 0


def test_graph_inputs_in_two_copies(tiny_model_dir, prompts, monkeypatch):
    """Long contexts stage the block tables in a second copy of only the columns in use."""
    from parallm.engine import decode_graph

    monkeypatch.setattr(decode_graph, "_ONE_COPY_MAX_BYTES", 0)
    path = str(tiny_model_dir("llama3"))
    common = dict(dtype="float32", device="cuda", kv_cache_memory=64 << 20)
    ref = LLM(path, attention_backend="reference", enforce_eager=True, **common)
    assert _greedy(LLM(path, **common), prompts)[0] == _greedy(ref, prompts)[0]


def _kv_bytes(llm: LLM, num_blocks: int) -> int:
    from parallm.engine.runner import kv_bytes_per_block

    per_block = kv_bytes_per_block(llm.engine.model_config, 16, torch.float32)
    return per_block * (num_blocks + 1)


@pytest.mark.parametrize("arch", ["llama3", "qwen3"])
def test_bf16_greedy_within_tolerance_of_transformers(tiny_model_dir, prompts, arch):
    """In bf16, tokens equal transformers' until a near-tie, where either choice is legitimate."""
    path = str(tiny_model_dir(arch))
    llm = LLM(path, dtype="bfloat16", device="cuda", kv_cache_memory=64 << 20)
    ours, _ = _greedy(llm, prompts)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    gen = GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None,
                           pad_token_id=0, output_logits=True, return_dict_in_generate=True)  # fmt: skip
    full_matches = 0
    for prompt, our_tokens in zip(prompts, ours, strict=True):
        ids = torch.tensor([prompt], device="cuda")
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
        hf_tokens = out.sequences[0, len(prompt) :].tolist()
        if hf_tokens == our_tokens:
            full_matches += 1
            continue
        i = next(j for j, (a, b) in enumerate(zip(hf_tokens, our_tokens, strict=True)) if a != b)
        logprobs = torch.log_softmax(out.logits[i][0].float(), dim=-1)
        gap = (logprobs[hf_tokens[i]] - logprobs[our_tokens[i]]).item()
        assert gap < 0.1, (
            f"diverged at token {i} where transformers preferred its token by {gap:.3f}"
        )
    assert full_matches >= len(prompts) // 2


@pytest.mark.multi_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_an_engine_on_the_second_gpu_runs_there(tiny_model_dir, prompts):
    """device='cuda:1' makes that GPU current (CUDA graphs, Triton launches and events follow
    the current device, not the tensors') and gives cuda:0's tokens."""
    path = str(tiny_model_dir("llama3"))
    first = _greedy(LLM(path, device="cuda:0", dtype="float32"), prompts)[0]
    try:
        second = LLM(path, device="cuda:1", dtype="float32")
        assert torch.cuda.current_device() == 1
        assert second.engine.runner.kv_caches[0].device == torch.device("cuda:1")
        assert _greedy(second, prompts)[0] == first
    finally:
        torch.cuda.set_device(0)  # the other tests of this process use the default device


def test_a_gpu_index_past_the_last_is_refused_by_name(tiny_model_dir):
    n = torch.cuda.device_count()
    with pytest.raises(ValueError, match=rf"device='cuda:{n}': this process sees {n} CUDA"):
        LLM(str(tiny_model_dir("llama3")), device=f"cuda:{n}")


def test_close_gives_back_the_device_memory_of_graphs_kv_and_drafter(tiny_model_dir, prompts):
    """The runner and its CUDA graphs reference each other: without close() an engine's
    memory stays until a garbage collection, and a second engine in the process starts with
    less (the oracle bench's third engine once found none for its KV cache). The first
    engine leaves what the process keeps once (cuBLAS workspaces); a second, closed, adds
    nothing to it."""
    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1}
    left = []
    for _ in range(2):
        llm = LLM(str(tiny_model_dir("llama3")), max_model_len=256, kv_cache_memory=64 << 20,
                  speculative_config=spec)  # fmt: skip
        _greedy(llm, prompts)
        assert torch.cuda.memory_allocated() > 64 << 20
        llm.close()
        torch.cuda.synchronize()
        left.append(torch.cuda.memory_allocated())
    assert left[1] - left[0] < 1 << 20


def test_eager_decode_steps_start_the_longest_rows_first(tiny_model_dir, prompts, monkeypatch):
    """An eager pure decode step hands the decode kernel its rows longest first, as the decode
    graphs stage them: the order pays there too, and no unordered variant of the kernel is
    left to compile under load (one did in the twenty-seventh session's serving run)."""
    from parallm.kernels import paged_decode

    seen: list[tuple[list[int], list[int]]] = []
    real = paged_decode.paged_decode_attention

    def recording(q, k_cache, v_cache, tables, seq_lens, *args, row_order=None, **kwargs):
        assert row_order is not None, "an eager decode step ran unordered"
        seen.append((seq_lens.tolist(), row_order.tolist()))
        return real(q, k_cache, v_cache, tables, seq_lens, *args, row_order=row_order, **kwargs)

    monkeypatch.setattr(paged_decode, "paged_decode_attention", recording)
    path = str(tiny_model_dir("llama3"))
    common = dict(dtype="float32", device="cuda", kv_cache_memory=64 << 20)
    eager = LLM(path, enforce_eager=True, **common)
    ref = LLM(path, attention_backend="reference", enforce_eager=True, **common)
    assert _greedy(eager, prompts)[0] == _greedy(ref, prompts)[0]  # prompts of 1 to 150 tokens
    assert seen and any(len(set(lens)) > 1 for lens, _ in seen)
    for lens, order in seen:
        assert order == paged_decode.longest_first(lens).tolist()


def test_a_full_prefix_hit_admitted_beside_decodes_replays_the_decode_graph(
    tiny_model_dir, prompts
):
    """A prompt whose every block is cached leaves one token to compute: admitted into a
    decode step launched ahead, that step's decode rows take their ids from the device and
    the prompt's from the host, in the decode graph rather than eagerly. Every request's
    tokens stay the reference's."""
    path = str(tiny_model_dir("llama3"))
    common = dict(dtype="float32", device="cuda", kv_cache_memory=64 << 20)
    fast = LLM(path, **common)
    engine, graphs = fast.engine, fast.engine.runner.graphs
    assert engine.async_scheduling and graphs is not None
    calls: list[tuple[int, int | None]] = []
    real_run = graphs.run

    def recording(input_ids, *arrays, device_ids=None):
        calls.append((len(input_ids), None if device_ids is None else len(device_ids)))
        return real_run(input_ids, *arrays, device_ids=device_ids)

    graphs.run = recording
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    # Two full blocks and one token: a hit leaves only the last token (the last token is
    # always computed, so a prompt of exactly two blocks would hit one and compute 16).
    hit = [t for p in prompts for t in p][: 2 * engine.runner.block_size + 1]
    queue = [*[p for p in prompts if len(p) > 4][:3], hit]
    fast.generate([{"prompt_token_ids": hit}], params, use_tqdm=False)  # its blocks cached
    # The hit arrives at step 6, when the decode rows run ahead.
    got, _, _ = run_arrivals(fast, queue, [params] * len(queue), [0, 0, 0, 6])
    assert any(ids is not None and ids < batch for batch, ids in calls), calls
    ref = LLM(path, attention_backend="reference", enforce_eager=True, **common)
    assert [got[f"r{i}"][0] for i in range(len(queue))] == _greedy(ref, queue)[0]
