"""Tensor-parallel inference on CPU (gloo): ranks 1..N-1 in worker processes, rank 0 in ours.

Greedy output must be token-identical to one rank, through chunked prefill, prefix-cache hits,
preemption, n > 1 and prompt logprobs; bad sizes are refused before loading; a dead worker
makes the next step fail with an error naming it, and leaves no process behind.
"""

from __future__ import annotations

import multiprocessing
import os
import signal

import numpy as np
import pytest
import torch
import torch.distributed as dist
from process_checks import assert_children_exit_when_killed

from parallm import LLM, SamplingParams
from parallm.cli import build_parser
from parallm.commands.engine_args import engine_kwargs
from parallm.config import ModelConfig
from parallm.engine.runner import kv_bytes_per_block
from parallm.models.loader import CheckpointSlice, load_model

BLOCK = 16
ENGINE = {"dtype": "float32", "device": "cpu", "max_model_len": 128, "block_size": BLOCK,
          "max_num_batched_tokens": 48}  # fmt: skip
GREEDY = SamplingParams(n=2, temperature=0, max_tokens=20, ignore_eos=True)
SCORED = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=1)
# Four prompts longer than the step budget (chunked prefill) sharing a 32-token prefix.
PREFIX, LENGTHS = 32, (20, 28, 9, 35)


def shared_prefix_prompts(vocab: int, prefix: int, lengths: tuple[int, ...]) -> list[list[int]]:
    """Random prompts (seeded) of a ``prefix``-token prefix and then ``lengths`` tokens each."""
    rng = np.random.default_rng(0)
    common = rng.integers(0, vocab, prefix).tolist()
    return [common + rng.integers(0, vocab, n).tolist() for n in lengths]


def run_rounds(
    llm: LLM, greedy: SamplingParams, prefix: int = PREFIX, lengths: tuple[int, ...] = LENGTHS
) -> tuple[list, list]:
    """Token ids of every sample of ``greedy`` over two rounds of the shared-prefix prompts
    (the second hits the prefix cache), and the prompt logprobs of a scored request (also
    the GPU tests', test_tensor_parallel_gpu.py)."""
    prompts = shared_prefix_prompts(llm.engine.model_config.vocab_size, prefix, lengths)
    tokens = []
    for _ in range(2):
        outs = llm.generate(prompts, greedy, use_tqdm=False)
        tokens.append([[c.token_ids for c in out.outputs] for out in outs])
    (scored,) = llm.generate([prompts[0]], SCORED, use_tqdm=False)
    logprobs = [next(iter(d.values())).logprob for d in scored.prompt_logprobs[1:]]
    return tokens, logprobs


def _kv_memory(path, blocks: int | None, tp: int) -> dict:
    """kv_cache_memory for ``blocks`` blocks per rank (None: roomy), so that every tensor
    parallel size schedules alike."""
    if blocks is None:
        return {"kv_cache_memory": 8 << 20}
    per_block = kv_bytes_per_block(ModelConfig.from_path(str(path)), BLOCK, torch.float32, tp)
    return {"kv_cache_memory": (blocks + 1) * per_block}


@pytest.mark.parametrize(
    ("arch", "tp", "blocks"),
    [
        ("llama3", 2, None),
        ("qwen3", 2, 12),  # 12 blocks for 4x2 samples of ~80 tokens: preemption
        ("llama3", 4, None),  # 2 KV heads on 4 ranks: each KV head replicated twice
    ],
)
def test_tensor_parallel_greedy_equals_one_rank(tiny_model_dir, arch, tp, blocks):
    path = tiny_model_dir(arch)
    reference = LLM(str(path), **ENGINE, **_kv_memory(path, blocks, 1))
    want_tokens, want_logprobs = run_rounds(reference, GREEDY)

    llm = LLM(str(path), tensor_parallel_size=tp, **ENGINE, **_kv_memory(path, blocks, tp))
    try:
        assert len(multiprocessing.active_children()) == tp - 1
        tokens, logprobs = run_rounds(llm, GREEDY)
        stats = llm.engine.stats
    finally:
        llm.close()
    assert tokens == want_tokens
    assert logprobs == pytest.approx(want_logprobs, abs=1e-4)
    assert stats["num_prefix_cache_hit_tokens"] > 0
    if blocks is not None:
        assert stats["num_preemptions"] > 0
        assert reference.engine.stats["num_preemptions"] > 0
    assert multiprocessing.active_children() == []
    assert not dist.is_initialized()


def test_quantized_weights_shard_like_float_ones(tiny_model_dir):
    """int8 weights on two ranks: each rank quantizes its loaded shard (a row-parallel
    shard's scales cover only its columns, so logits move slightly from TP=1's); on this
    fixed tiny model the greedy tokens still agree with TP=1's quantized model."""
    path, quantized = str(tiny_model_dir("qwen3")), {**ENGINE, "quantization": "int8"}
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = shared_prefix_prompts(ModelConfig.from_path(path).vocab_size, PREFIX, LENGTHS)[:2]
    reference = LLM(path, **quantized)
    want = [o.outputs[0].token_ids for o in reference.generate(prompts, params, use_tqdm=False)]
    llm = LLM(path, tensor_parallel_size=2, **quantized)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        llm.close()
    assert got == want


def test_a_shard_reads_only_its_slices_of_the_weight_matrices(tiny_model_dir, monkeypatch):
    path = tiny_model_dir("qwen3")
    cfg, cpu = ModelConfig.from_path(str(path)), torch.device("cpu")
    whole = load_model(path, cfg, torch.float32, cpu, 128, packed=True)
    read_whole, full = [], CheckpointSlice.full

    def spy(self):
        read_whole.append(tuple(self.shape))
        return full(self)

    monkeypatch.setattr(CheckpointSlice, "full", spy)
    shard = load_model(path, cfg, torch.float32, cpu, 128, packed=True, tp_rank=1, tp_size=2)
    assert read_whole and all(len(shape) == 1 for shape in read_whole)  # norms only
    layer, full_layer = shard.model.layers[1], whole.model.layers[1]
    pairs = [  # (rank 1's weight, the whole one, the split dimension)
        (layer.self_attn.o_proj.weight, full_layer.self_attn.o_proj.weight, 1),
        (layer.mlp.down_proj.weight, full_layer.mlp.down_proj.weight, 1),
        (shard.lm_head.weight, whole.lm_head.weight, 0),
    ]
    for mine, full_weight, dim in pairs:
        n = mine.shape[dim]
        assert full_weight.shape[dim] == 2 * n
        assert torch.equal(mine, full_weight.narrow(dim, n, n))


def test_tensor_parallel_size_that_does_not_split_the_heads_is_refused_before_loading(
    tiny_model_dir, monkeypatch
):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr("parallm.engine.engine.load_model", no_loading)
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(3\) must divide "
                                         r"num_attention_heads \(4\)"):  # fmt: skip
        LLM(str(tiny_model_dir("llama3")), tensor_parallel_size=3, **ENGINE)
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("size", [0, -2, 1.5, "2", True])
def test_tensor_parallel_size_must_be_a_positive_integer(tiny_model_dir, size):
    with pytest.raises(ValueError, match=r"tensor_parallel_size must be an integer >= 1"):
        LLM(str(tiny_model_dir("llama3")), tensor_parallel_size=size, **ENGINE)


def test_a_killed_worker_fails_the_next_generate_and_nothing_is_left(tiny_model_dir):
    check_killed_worker_fails_the_engine(str(tiny_model_dir("llama3")), ENGINE)


def check_killed_worker_fails_the_engine(model: str, engine: dict) -> None:
    """Also the GPU test's body (test_tensor_parallel_gpu.py)."""
    llm = LLM(model, tensor_parallel_size=2, **engine)
    try:
        (worker,) = multiprocessing.active_children()
        prompt = [5, 17, 42, 99, 7]
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        assert len(llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids) == 4
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(30)
        message = r"tensor-parallel worker rank 1 \(pid \d+\) exited with code -9"
        with pytest.raises(RuntimeError, match=message):
            llm.generate([prompt], params, use_tqdm=False)
        assert not llm.engine.has_unfinished_requests()
        assert not dist.is_initialized()  # the driver left the group
        with pytest.raises(RuntimeError, match=message):  # and stays failed
            llm.generate([prompt], params, use_tqdm=False)
    finally:
        llm.close()
    assert multiprocessing.active_children() == []


def test_a_step_the_driver_abandons_stops_the_engine(tiny_model_dir, monkeypatch):
    """The driver's forward raises after the workers got the step (they wait in its first
    all-reduce): the ranks are out of step, so the engine stops for good, workers included."""
    check_abandoned_step_stops_the_engine(str(tiny_model_dir("llama3")), ENGINE, monkeypatch)


def check_abandoned_step_stops_the_engine(model: str, engine: dict, monkeypatch) -> None:
    """Also the GPU test's body (test_tensor_parallel_gpu.py)."""
    llm = LLM(model, tensor_parallel_size=2, **engine)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    try:
        monkeypatch.setattr(llm.engine.runner, "_hidden", _interrupted)
        with pytest.raises(KeyboardInterrupt):
            llm.generate([[5, 17, 42]], params, use_tqdm=False)
        assert multiprocessing.active_children() == []
        assert not dist.is_initialized()
        monkeypatch.undo()
        with pytest.raises(RuntimeError, match=r"stopped: a step raised KeyboardInterrupt"):
            llm.generate([[5, 17, 42]], params, use_tqdm=False)
    finally:
        llm.close()


def _interrupted(*args, **kwargs):
    raise KeyboardInterrupt


def test_workers_leave_sigint_and_sigterm_to_the_driver(tiny_model_dir):
    """A Ctrl-C or a SIGTERM sent to the whole process group reaches the workers too: they
    keep serving so that the driver can drain, and stop when it closes them."""
    llm = LLM(str(tiny_model_dir("llama3")), tensor_parallel_size=2, **ENGINE)
    try:
        (worker,) = multiprocessing.active_children()
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            os.kill(worker.pid, sig)
            (out,) = llm.generate([[5, 17, 42]], params, use_tqdm=False)
            assert len(out.outputs[0].token_ids) == 4
        assert worker.is_alive()
    finally:
        llm.close()
    assert multiprocessing.active_children() == []


def test_workers_exit_when_the_driver_is_killed(tiny_model_dir, tmp_path):
    engine = {**ENGINE, "kv_cache_memory": 8 << 20, "tensor_parallel_size": 2}
    assert_children_exit_when_killed(
        tmp_path, str(tiny_model_dir("llama3")), "parallm-tp", 1, **engine
    )


def test_cli_flag_reaches_the_engine():
    args = build_parser().parse_args(["generate", "--tensor-parallel-size", "2", "x"])
    assert engine_kwargs(args)["tensor_parallel_size"] == 2
    args = build_parser().parse_args(["generate", "x"])
    assert engine_kwargs(args)["tensor_parallel_size"] == 1
