"""The server's data-parallel bridge (``AsyncEngine`` over several engine cores), with fake
cores that record the commands they are sent: new requests are routed by cached prefix and
load, aborts and failures go to the replica that holds the request, the router is told when
requests end, counters are kept per replica and summed, and one replica's death fails its
requests alone with a 503 naming it. (No processes: the real cores are in
test_data_parallel_serve.py.)"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch

from parallm.cli import build_parser
from parallm.cli import main as cli_main
from parallm.commands.engine_args import engine_kwargs
from parallm.engine import replica_devices
from parallm.engine.core import replicas
from parallm.engine.core.client import EngineCoreError, EngineView
from parallm.engine.core.messages import (
    AbortAll,
    AbortRequests,
    AddRequests,
    CoreOutputs,
    EngineInfo,
    EngineStats,
)
from parallm.engine.core.replicas import _wait_until_ready, start_engine_cores
from parallm.outputs import CompletionOutput, RequestOutput
from parallm.sampling_params import SamplingParams
from parallm.server.async_engine import (
    AsyncEngine,
    EngineRequest,
    EngineUnavailable,
    RequestFailed,
)
from parallm.server.metrics import ServerMetrics

BLOCK = 4
INFO = EngineInfo(model="fake", max_model_len=1024, vocab_size=1000, max_num_seqs=8,
                  num_blocks=64, summary="fake", block_size=BLOCK)  # fmt: skip
SHARED = list(range(100, 120))  # five full blocks


class FakeCore:
    """An engine core that only records what it is sent; the test plays its outputs."""

    def __init__(self) -> None:
        self.info = INFO
        self.engine = EngineView(INFO, None)
        self.sent: list = []
        self.alive = True
        self.on_outputs: Callable[[CoreOutputs], None] | None = None
        self.on_death: Callable[[str], None] | None = None

    def start(self, on_outputs, on_death) -> None:
        self.on_outputs, self.on_death = on_outputs, on_death

    def send(self, command) -> None:
        self.sent.append(command)

    def is_alive(self) -> bool:
        return self.alive

    def stop(self, timeout_s: float = 10.0) -> None:
        self.alive = False

    def added(self) -> list[str]:
        return [r.request_id for c in self.sent if isinstance(c, AddRequests) for r in c.requests]

    def aborted(self) -> list[str]:
        return [i for c in self.sent if isinstance(c, AbortRequests) for i in c.request_ids]


def _engine(num_replicas: int = 2) -> tuple[AsyncEngine, list[FakeCore]]:
    cores = [FakeCore() for _ in range(num_replicas)]
    engine = AsyncEngine(cores, max_num_waiting=100)
    engine.start()
    return engine, cores


def _request(request_id: str, prompt: list[int], n: int = 1) -> EngineRequest:
    return EngineRequest(request_id, prompt, SamplingParams(max_tokens=4, n=n))


def _finished(request_id: str, token_ids: list[int], n: int = 1) -> RequestOutput:
    samples = [CompletionOutput(i, "", list(token_ids), finish_reason="length") for i in range(n)]
    return RequestOutput(request_id, None, [], samples, finished=True)


def test_a_shared_prefix_follows_its_replica_and_misses_go_to_the_least_loaded() -> None:
    async def scenario() -> None:
        engine, cores = _engine()
        busy = engine.submit([_request("busy", [1, 2, 3, 4, 5, 6, 7, 8, 9])])
        first = engine.submit([_request("a", [*SHARED, 1])])  # replica 0 is busy: replica 1
        assert cores[0].added() == ["busy"] and cores[1].added() == ["a"]
        cores[1].on_outputs(CoreOutputs(outputs=[_finished("a", [7, 7, 7])]))
        cores[0].on_outputs(CoreOutputs(outputs=[_finished("busy", [7])]))
        assert [o.request_id async for o in first] == ["a"]
        assert [o.request_id async for o in busy] == ["busy"]
        assert engine.router.load == [0, 0]
        # Both idle now: a miss goes to replica 0, the shared prefix to replica 1 (its cache).
        engine.submit([_request("b", [*SHARED, 2]), _request("miss", [50, 51, 52, 53, 54])])
        assert cores[1].added() == ["a", "b"] and cores[0].added() == ["busy", "miss"]
        # The finished request's output blocks count as cached there too (a chat's next turn).
        assert engine.router.matched_blocks(1, [*SHARED, 1, 7, 7, 7, 8]) == 6

    asyncio.run(scenario())


def test_aborts_and_failures_go_to_the_replica_that_holds_the_request() -> None:
    async def scenario() -> None:
        engine, cores = _engine()
        one = engine.submit([_request("r0", [1, 2, 3]), _request("r1", [4, 5, 6])])
        assert (engine.replica_of("r0"), engine.replica_of("r1")) == (0, 1)
        one.close()
        assert cores[0].aborted() == ["r0"] and cores[1].aborted() == ["r1"]
        assert engine.router.load == [0, 0] and engine._tracked == {}
        # An n > 1 request is one engine request: its samples stay on one replica.
        engine.submit([_request("n3", [9, 9, 9], n=3)])
        assert sum(c.added().count("n3") for c in cores) == 1
        # A request the core failed is aborted nowhere else, and frees its load.
        replica = engine.replica_of("n3")
        engine._fail("n3", "boom")
        assert cores[replica].aborted()[-1] == "n3"
        assert "n3" not in cores[1 - replica].aborted()
        assert engine.router.load == [0, 0]
        engine.abort_all()
        assert all(isinstance(c.sent[-1], AbortAll) for c in cores)

    asyncio.run(scenario())


def test_counters_are_kept_per_replica_and_summed() -> None:
    engine, cores = _engine()
    metrics = ServerMetrics(lambda: engine.snapshots, "fake", 1024)
    stats = [EngineStats(num_requests_running=2, num_blocks=64, num_blocks_in_use=16,
                         prefix_cache_queries=10, spec_accepted_per_position=(1, 2)),
             EngineStats(num_requests_running=1, num_requests_waiting=3, num_blocks=64,
                         num_blocks_in_use=48, spec_accepted_per_position=(5,))]  # fmt: skip
    for core, s in zip(cores, stats, strict=True):
        core.on_outputs(CoreOutputs(stats=s))
    total = engine.snapshot
    assert (total.num_requests_running, total.num_requests_waiting) == (3, 3)
    assert total.kv_cache_usage == 0.5 and total.prefix_cache_queries == 10
    assert total.spec_accepted_per_position == (6, 2)
    text = metrics.render().decode()
    assert 'parallm:num_requests_running{engine="0",model_name="fake"} 2.0' in text
    assert 'parallm:num_requests_running{engine="1",model_name="fake"} 1.0' in text
    assert 'parallm:kv_cache_usage_perc{engine="1",model_name="fake"} 0.75' in text


def test_one_replica_dying_fails_its_requests_alone_and_marks_the_engine_unhealthy() -> None:
    async def scenario() -> None:
        engine, cores = _engine()
        on_0 = engine.submit([_request("r0", [1, 2, 3])])
        on_1 = engine.submit([_request("r1", [4, 5, 6])])
        assert engine.is_healthy
        reason = "data-parallel replica 1: the engine core process (pid 7) died unexpectedly"
        cores[1].alive = False
        cores[1].on_death(reason)
        with pytest.raises(RequestFailed) as failed:
            [o async for o in on_1]
        assert failed.value.status == 503 and "data-parallel replica 1" in str(failed.value)
        assert not engine.is_healthy and engine.error == reason
        with pytest.raises(EngineUnavailable, match="data-parallel replica 1"):
            engine.submit([_request("late", [1])])
        # Replica 0's request goes on (the server drains it as it stops).
        assert engine.replica_of("r0") == 0
        cores[0].on_outputs(CoreOutputs(outputs=[_finished("r0", [3])]))
        assert [o.request_id async for o in on_0] == ["r0"]

    asyncio.run(scenario())


def test_serve_takes_the_data_parallel_flag_and_refuses_it_without_core_processes(
    capsys: pytest.CaptureFixture,
) -> None:
    args = build_parser().parse_args(["serve", "-dp", "2", "x"])
    assert engine_kwargs(args)["data_parallel_size"] == 2
    with pytest.raises(ValueError, match=r"got 2 for `parallm bench latency`"):
        engine_kwargs(build_parser().parse_args(["bench", "latency", "-dp", "2"]))
    assert cli_main(["serve", "-dp", "2", "--disable-frontend-multiprocessing"]) == 2
    assert "--data-parallel-size above 1 runs one engine-core process per replica" in (
        capsys.readouterr().err
    )


class LoadingClient:
    """A core client for ``_wait_until_ready``: loads until killed, or fails at once."""

    def __init__(self, failure: Exception | None = None) -> None:
        self.failure = failure
        self.killed = threading.Event()
        self.process = SimpleNamespace(kill=self.killed.set)

    def wait_ready(self) -> None:
        if self.failure is not None:
            raise self.failure
        if self.killed.wait(60):
            raise EngineCoreError("exited with code -9 while loading the engine")


def test_the_first_replica_failing_to_start_is_raised_and_the_loading_ones_killed() -> None:
    clients = [LoadingClient(), LoadingClient(EngineCoreError("data-parallel replica 1: boom"))]
    with pytest.raises(EngineCoreError, match="data-parallel replica 1: boom"):
        _wait_until_ready(clients)
    assert clients[0].killed.is_set()


def test_data_parallel_serving_refuses_a_tensor_parallel_torchrun_job(monkeypatch) -> None:
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="data_parallel_size=2 cannot be combined with a "
                                         "tensor-parallel torchrun job"):  # fmt: skip
        start_engine_cores({"model": "x", "data_parallel_size": 2, "tensor_parallel_size": 2})


def test_each_replica_sees_its_own_gpus(monkeypatch) -> None:
    """On CUDA replica i sees GPUs [i * tp, (i + 1) * tp) of this process's visible ones."""
    monkeypatch.setattr(replica_devices, "resolve_device", lambda device: torch.device(device))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    envs = replicas.replica_environments("cuda", 2, 2)
    assert envs == [{"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "2,3"}]
    assert replicas.replica_environments("cuda", 1, 2) == [{}]  # one replica keeps them all
    assert replicas.replica_environments("cpu", 2, 2) == [{}, {}]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert [e["CUDA_VISIBLE_DEVICES"] for e in replicas.replica_environments("cuda", 4, 1)] == [
        "4", "5", "6", "7"
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"data_parallel_size=2 x tensor_parallel_size=4 needs "
                                         r"8 GPUs; this process sees 4"):  # fmt: skip
        replicas.replica_environments("cuda", 2, 4)
    with pytest.raises(ValueError, match="device must be 'cuda' or 'auto', got device='cuda:1'"):
        replicas.replica_environments("cuda:1", 2, 1)


def test_engine_cores_leave_the_api_process_a_cpu(monkeypatch) -> None:
    """Each core's torch threads share out the CPUs less one for the API process: a core
    that takes them all stalls whenever the API process runs."""
    started = []

    class Client:
        def __init__(self, engine_kwargs, num_threads=None, **kwargs) -> None:
            started.append(num_threads)

        def wait_ready(self) -> None:
            pass

    monkeypatch.setattr(replicas, "EngineCoreClient", Client)
    monkeypatch.setattr(replicas.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    replicas.start_engine_cores({"model": "x", "device": "cpu"})
    replicas.start_engine_cores({"model": "x", "device": "cpu", "data_parallel_size": 2})
    replicas.start_engine_cores({"model": "x", "device": "cpu", "data_parallel_size": 3}, 2)
    assert started == [7, 3, 3, 2, 2, 2]
    monkeypatch.setattr(replicas.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert replicas.core_threads(1) == 1 and replicas.core_threads(4) == 1
