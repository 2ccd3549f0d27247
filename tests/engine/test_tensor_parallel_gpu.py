"""Tensor-parallel inference on GPUs (NCCL), and the checks that let it start.

The GPU tests need two CUDA devices and skip otherwise. Greedy identity with one rank is
asserted in float32: in bfloat16 the all-reduce adds the ranks' partial sums in another order
than one GPU's matmul does, which can flip a near-tie between two tokens, while in float32 the
difference (~1e-6 relative) stays far below the gaps between a random model's logits. The CPU
tests check the start-up checks with a monkeypatched GPU count.
"""

from __future__ import annotations

import json
import multiprocessing
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
from test_tensor_parallel import (
    check_abandoned_step_stops_the_engine,
    check_killed_worker_fails_the_engine,
    run_rounds,
)

from parallm import LLM, SamplingParams
from parallm.cli import main
from parallm.config import EngineConfig, ModelConfig
from parallm.engine.executor import check_tensor_parallel, rank_device
from parallm.engine.runner import kv_bytes_per_block
from parallm.engine.step_channel import StepChannel

BLOCK = 16
GREEDY = SamplingParams(n=2, temperature=0, max_tokens=24, ignore_eos=True)
ENGINE = {"dtype": "float32", "device": "cuda", "max_model_len": 256, "block_size": BLOCK,
          "max_num_batched_tokens": 64, "max_num_seqs": 16}  # fmt: skip

needs_two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="needs 2 CUDA devices",
)


def _run(llm: LLM) -> tuple[list, list]:
    """``run_rounds`` on prompts longer than the step budget (chunked prefill) sharing a
    40-token prefix."""
    return run_rounds(llm, GREEDY, 40, (30, 47, 9, 70, 1))


@pytest.mark.gpu
@pytest.mark.multi_gpu
@needs_two_gpus
@pytest.mark.parametrize("eager", [False, True], ids=["graphs", "eager"])
@pytest.mark.parametrize("arch", ["llama3", "qwen3"])
def test_two_gpus_give_one_gpu_greedy_tokens(tiny_model_dir, arch, eager):
    """TP=2 with decode graphs (every rank replays the graph rank 0 replays) and eagerly both
    give one GPU's tokens: graphs and eager agree under tensor parallelism."""
    path = str(tiny_model_dir(arch, head_dim=64))
    reference = LLM(path, **ENGINE)
    want_tokens, want_logprobs = _run(reference)
    del reference

    llm = LLM(path, tensor_parallel_size=2, enforce_eager=eager, **ENGINE)
    try:
        assert len(multiprocessing.active_children()) == 1
        summary = llm.engine.summary()
        assert "tensor_parallel_size=2 (nccl" in summary
        assert (llm.engine.runner.graphs is None) == eager
        if not eager:
            assert llm.engine.runner.graphs.one_row is None  # the chain has no collectives
            assert "no one-row chain" in summary
        assert not llm.engine.async_scheduling
        assert os.environ.get("NCCL_NVLS_ENABLE") is not None
        assert os.environ.get("TORCH_SYMM_MEM_DISABLE_MULTICAST") is not None
        tokens, logprobs = _run(llm)
    finally:
        llm.close()
    assert tokens == want_tokens
    np.testing.assert_allclose(logprobs, want_logprobs, rtol=1e-4, atol=1e-4)
    assert multiprocessing.active_children() == []
    assert not dist.is_initialized()


@pytest.mark.gpu
@pytest.mark.multi_gpu
@needs_two_gpus
def test_each_rank_plans_its_own_card_and_the_fewest_blocks_win(tiny_model_dir):
    """GPU 1 is mostly taken (by this process): rank 1 has room for fewer blocks than rank 0,
    and the engine must use rank 1's count on both ranks."""
    path = tiny_model_dir("llama3", head_dim=64)
    cfg = ModelConfig.from_path(str(path))
    engine = {**ENGINE, "max_model_len": 4096, "max_num_seqs": 256, "enforce_eager": True}
    cap = 2 * 256 * (4096 // BLOCK)  # the engine's ceiling on blocks (prefix-cache room)
    per_rank_block = kv_bytes_per_block(cfg, BLOCK, torch.float32, 2)
    one_rank = LLM(str(path), tensor_parallel_size=1, **engine)
    assert one_rank.engine.kv.num_blocks == cap  # GPU 0 alone has room for the ceiling
    del one_rank
    torch.cuda.empty_cache()

    free, total = torch.cuda.mem_get_info(1)
    # What rank 1 is left: half the ceiling's bytes, plus 1 GiB for its CUDA context and NCCL
    # buffers (which its plan counts against the budget too).
    room = cap * per_rank_block // 2 + (1 << 30)
    hog = torch.empty(int(free - total * (1 - 0.9) - room), dtype=torch.uint8, device="cuda:1")
    llm = LLM(str(path), tensor_parallel_size=2, **engine)
    try:
        num_blocks = llm.engine.kv.num_blocks
        assert 0 < num_blocks < cap
        caches = llm.engine.runner.kv_caches
        assert caches[0].shape == (2, num_blocks + 1, BLOCK, 1, 64)  # 1 of the 2 KV heads
        prompt = [5, 17, 42, 99, 7]
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        assert len(llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids) == 4
    finally:
        llm.close()
        del hog
    assert multiprocessing.active_children() == []


@pytest.mark.gpu
@pytest.mark.multi_gpu
@needs_two_gpus
def test_a_killed_gpu_worker_fails_the_next_generate_and_nothing_is_left(tiny_model_dir):
    check_killed_worker_fails_the_engine(str(tiny_model_dir("llama3", head_dim=64)), ENGINE)


@pytest.mark.gpu
@pytest.mark.multi_gpu
@needs_two_gpus
def test_a_gpu_step_the_driver_abandons_stops_the_engine(tiny_model_dir, monkeypatch):
    """The driver raises after the worker got the step: the worker's all-reduces wait on the
    GPU for a rank that never joins, so the NCCL group is aborted (a destroy would wait), the
    worker exits and the engine stays stopped."""
    model = str(tiny_model_dir("llama3", head_dim=64))
    check_abandoned_step_stops_the_engine(model, ENGINE, monkeypatch)


# CPU: the start-up checks, with the GPU count monkeypatched.


def _model() -> ModelConfig:
    return ModelConfig.from_dict({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256,
    })  # fmt: skip


@pytest.fixture
def gpus(monkeypatch):
    def set_count(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return set_count


def test_cuda_tensor_parallelism_is_accepted_when_the_host_has_the_gpus(gpus):
    gpus(4)
    check_tensor_parallel(EngineConfig(tensor_parallel_size=2), _model(), torch.device("cuda"))
    check_tensor_parallel(EngineConfig(tensor_parallel_size=4), _model(), torch.device("cuda"))
    # device offset: ranks on GPUs 2 and 3
    check_tensor_parallel(EngineConfig(tensor_parallel_size=2), _model(), torch.device("cuda:2"))


@pytest.mark.parametrize(
    ("device", "count", "message"),
    [
        ("cuda", 1, r"tensor_parallel_size \(2\) needs 2 GPUs on this host \(device='cuda': "
                    r"GPUs 0\.\.1, one per rank\), but it has 1"),
        ("cuda:1", 2, r"tensor_parallel_size \(2\) needs 2 GPUs on this host \(device='cuda:1': "
                      r"GPUs 1\.\.2, one per rank\), but it has 2"),
    ],
)  # fmt: skip
def test_more_ranks_than_gpus_is_refused_before_loading(gpus, device, count, message):
    gpus(count)
    with pytest.raises(ValueError, match=message):
        check_tensor_parallel(EngineConfig(tensor_parallel_size=2), _model(), torch.device(device))


def test_a_torchrun_job_needs_a_gpu_per_local_rank(gpus, monkeypatch):
    """Two hosts of two ranks each: each host needs 2 GPUs, not 4."""
    gpus(2)
    env = {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h",
           "MASTER_PORT": "1"}  # fmt: skip
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    check_tensor_parallel(EngineConfig(tensor_parallel_size=4), _model(), torch.device("cuda"))
    gpus(1)
    with pytest.raises(ValueError, match=r"needs 2 GPUs on this host"):
        check_tensor_parallel(EngineConfig(tensor_parallel_size=4), _model(), torch.device("cuda"))


def test_other_device_types_are_named():
    with pytest.raises(ValueError, match=r"runs on device='cpu' \(gloo\) or 'cuda' \(NCCL\)"):
        check_tensor_parallel(EngineConfig(tensor_parallel_size=2), _model(), torch.device("mps"))


def test_rank_r_runs_on_the_gpu_r_after_the_engine_device():
    assert rank_device("cuda", 1) == torch.device("cuda", 1)
    assert rank_device("cuda:2", 1) == torch.device("cuda", 3)
    assert rank_device(torch.device("cuda:0"), 0) == torch.device("cuda", 0)
    assert rank_device("cpu", 3) == torch.device("cpu")


def test_bench_latency_and_throughput_run_tensor_parallel(tiny_model_dir, tmp_path):
    """Issue 18's benchmarks go through the executor (gloo here), report per-GPU bytes
    (each rank reads half the weights and half the KV), and leave no worker behind."""
    config = str(tiny_model_dir("llama3") / "config.json")
    latency = ["bench", "latency", "--config", config, "--device", "cpu", "--batch-sizes", "2",
               "--input-len", "8", "--output-len", "4", "--iters", "1"]  # fmt: skip
    results = {}
    for tp in (1, 2):
        out = tmp_path / f"latency-tp{tp}.json"
        assert main([*latency, "--tensor-parallel-size", str(tp), "--out", str(out)]) == 0
        results[tp] = json.loads(out.read_text())
        assert multiprocessing.active_children() == [] and not dist.is_initialized()
    assert "tensor_parallel_size=2 (gloo" in results[2]["summary"]
    assert results[2]["weight_bytes"] < results[1]["weight_bytes"]
    kv_bytes = {
        tp: r["results"][0]["bytes_per_step"] - r["weight_bytes"] for tp, r in results.items()
    }
    assert kv_bytes[2] == kv_bytes[1] / 2

    out = tmp_path / "throughput.json"
    assert main(["bench", "throughput", "--config", config, "--device", "cpu",
                 "--num-requests", "4", "--min-len", "4", "--max-len", "8",
                 "--tensor-parallel-size", "2", "--out", str(out)]) == 0  # fmt: skip
    payload = json.loads(out.read_text())
    assert "tensor_parallel_size=2 (gloo" in payload["summary"]
    assert payload["results"][0]["requests"] == 4
    assert multiprocessing.active_children() == [] and not dist.is_initialized()


def _receive_one_graph_step(init_method: str, conn) -> None:
    dist.init_process_group("gloo", init_method=init_method, rank=1, world_size=2)
    channel = StepChannel(dist.new_group(backend="gloo"))
    command, _, arrays, rows = channel.recv()
    conn.send((command, [(a.dtype.str, a.shape, a.tolist()) for a in arrays], rows))
    dist.destroy_process_group()


def test_a_graph_step_reaches_the_workers_as_decode_graphs_run_takes_it(tmp_path):
    """GRAPH_STEP carries ``DecodeGraphs.run``'s arrays: each arrives with its dtype and
    shape (the block tables as rows of the sent width)."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    init_method = f"file://{tmp_path / 'rendezvous'}"
    worker = ctx.Process(target=_receive_one_graph_step, args=(init_method, child))
    worker.start()
    dist.init_process_group("gloo", init_method=init_method, rank=0, world_size=2)
    try:
        channel = StepChannel(dist.new_group(backend="gloo"))
        sent = (
            np.array([5, 17, 42], np.int64), np.array([9, 30, 2], np.int64),
            np.array([153, 510, 66], np.int64), np.array([10, 31, 3], np.int32),
            np.array([[9, 0], [31, 32], [4, 0]], np.int32),
        )  # fmt: skip
        channel.send_graph_step(sent)
        command, got, rows = parent.recv()
    finally:
        dist.destroy_process_group()
        worker.join(30)
    assert command == StepChannel.GRAPH_STEP and rows is None
    assert got == [(a.dtype.str, a.shape, a.tolist()) for a in sent]
    assert worker.exitcode == 0
