"""Leaving a tensor-parallel group: the CUDA graphs that captured its collectives go first.

NCCL (2.26 and later) destroys or aborts a communicator only once every CUDA graph that
captured one of its operations is gone; the engine keeps its decode graphs (which hold the
row-parallel all-reduces) until the engine itself is gone, so a ``leave_group`` that kept them
would wait forever in ``destroy_process_group``. The CPU tests check the order with a stand-in
graph; the GPU test leaves an NCCL group of two GPUs after capturing an all-reduce.
"""

from __future__ import annotations

import multiprocessing

import pytest
import torch
import torch.distributed as dist

from parallm.engine import tp_group


class _Graph:
    """A stand-in for ``torch.cuda.CUDAGraph`` that logs its ``reset``."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def reset(self) -> None:
        self.log.append("graph reset")


@pytest.fixture
def one_rank_group(tmp_path):
    tp_group.join_group(torch.device("cpu"), f"file://{tmp_path / 'rendezvous'}", 0, 1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_leave_group_destroys_tracked_graphs_before_the_group(one_rank_group, monkeypatch):
    log: list[str] = []
    destroy = dist.destroy_process_group

    def logged_destroy(*args, **kwargs):
        log.append("group destroyed")
        destroy(*args, **kwargs)

    monkeypatch.setattr(dist, "destroy_process_group", logged_destroy)
    graphs = [_Graph(log), _Graph(log)]
    for graph in graphs:
        tp_group.track_captured_collectives(graph)
    tp_group.leave_group(aborting=False)
    assert log == ["graph reset", "graph reset", "group destroyed"]
    assert not dist.is_initialized()
    assert len(tp_group._CAPTURED_GRAPHS) == 0  # a later group starts with none


def test_graphs_captured_outside_a_group_are_not_tracked():
    assert not dist.is_initialized()
    graph = _Graph([])
    tp_group.track_captured_collectives(graph)
    assert graph not in tp_group._CAPTURED_GRAPHS


def test_tracking_keeps_no_graph_alive(one_rank_group):
    """Graphs the engine dropped are not kept for ``leave_group`` (weak references)."""
    tp_group.track_captured_collectives(_Graph([]))
    assert len(tp_group._CAPTURED_GRAPHS) == 0


def _capture_all_reduce_then_leave(init_method: str, rank: int, conn) -> None:
    tp_group.join_group(torch.device("cuda", rank), init_method, rank, 2)
    x = torch.full((4096,), float(rank + 1), device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        dist.all_reduce(x)  # the communicator is created outside the capture
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dist.all_reduce(x)
    graph.replay()
    torch.cuda.synchronize()
    tp_group.track_captured_collectives(graph)
    conn.send(("replayed", x[0].item()))
    tp_group.leave_group(aborting=False)  # `graph` is still referenced here
    conn.send(("left",))


@pytest.mark.gpu
@pytest.mark.multi_gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"
)
def test_two_gpu_ranks_leave_their_nccl_group_with_a_captured_all_reduce_alive(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    init_method = f"file://{tmp_path / 'rendezvous'}"
    pipes = [ctx.Pipe() for _ in range(2)]
    procs = [
        ctx.Process(target=_capture_all_reduce_then_leave, args=(init_method, r, pipes[r][1]))
        for r in range(2)
    ]
    for proc in procs:
        proc.start()
    try:
        for parent, _ in pipes:
            assert parent.poll(120), "a rank did not capture and replay its all-reduce"
            assert parent.recv() == ("replayed", 6.0)  # (1 + 2) once eagerly, doubled by the replay
        for rank, (parent, _) in enumerate(pipes):
            assert parent.poll(60), f"rank {rank} hangs leaving the group"
            assert parent.recv() == ("left",)
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    assert [proc.exitcode for proc in procs] == [0, 0]


def test_an_abort_that_hangs_is_left_behind_with_a_warning(one_rank_group, monkeypatch, caplog):
    """NCCL's abort can wait for a rank that died; the failing engine must still go on to stop
    its workers, so the abort runs on a thread that leave_group waits for only so long."""
    import threading

    release = threading.Event()
    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "nccl")
    monkeypatch.setattr(dist.distributed_c10d, "_abort_process_group", lambda: release.wait(30))
    monkeypatch.setattr(tp_group, "_ABORT_SECONDS", 0.2)
    with caplog.at_level("WARNING", logger="parallm"):
        tp_group.leave_group(aborting=True)
    release.set()
    assert "did not finish in 0.2 s" in caplog.text


def test_an_abort_that_fails_raises_in_the_caller(one_rank_group, monkeypatch):
    def fail():
        raise RuntimeError("abort failed")

    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "nccl")
    monkeypatch.setattr(dist.distributed_c10d, "_abort_process_group", fail)
    with pytest.raises(RuntimeError, match="abort failed"):
        tp_group.leave_group(aborting=True)
