"""A tensor-parallel job's process groups: the default group, whose collectives run inside
each step's forward (gloo on the CPU, NCCL on GPUs), and the gloo control group over which
the driver sends its commands (``StepChannel``)."""

from __future__ import annotations

import logging
import os
import threading
import weakref
from datetime import timedelta

import torch
import torch.distributed as dist

# How long a collective inside a step waits for a rank that is alive but late (a slow CPU
# step). A rank that dies closes its connections, which fails the collective at once instead.
_COLLECTIVE_TIMEOUT = timedelta(minutes=10)
# The control group's waits (a worker for the next command, the driver for a worker to take
# one or to load its shard). The driver sends heartbeats (executor.py) well within it, so
# idle workers keep waiting, and a rank that is gone without closing its connections (its
# host vanished) is noticed within the timeout.
_CONTROL_TIMEOUT = timedelta(minutes=30)
# How long a rank waits at start-up for the others to reach the rendezvous: ranks on other
# hosts, or started by hand, may come minutes apart, whatever the collective timeout is.
_RENDEZVOUS_TIMEOUT = timedelta(minutes=10)

# How long a failed engine waits for NCCL's abort. The abort may itself wait for a peer that is
# gone (NCCL's intra-node ranks free some resources together); the engine then goes on to stop
# its workers and fail, and the driver frees what is left when its process ends.
_ABORT_SECONDS = 30.0

logger = logging.getLogger("parallm")

# NVLink multicast (NVLS) stays off: the lent multi-GPU machines do not support it, and NCCL or
# symmetric memory would fail at start-up trying it. A value the user set is kept.
_NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}

# CUDA graphs of this process that may hold collectives of the default group. NCCL (2.26 and
# later) destroys or aborts a communicator only once every graph that captured its operations
# is gone, and the engine keeps its decode graphs until it is gone itself: leaving the group
# with one of them alive would wait forever, so ``leave_group`` destroys them first.
_CAPTURED_GRAPHS: weakref.WeakSet[torch.cuda.CUDAGraph] = weakref.WeakSet()


def join_group(device: torch.device, init_method: str, rank: int, world_size: int) -> None:
    """Join the default group, whose collectives run inside each step's forward: gloo on
    the CPU, NCCL on GPUs (``device`` is this rank's own GPU, made current first so that
    NCCL binds to it)."""
    backend = "gloo"
    if device.type == "cuda":
        backend = "nccl"
        for name, value in _NCCL_ENV.items():
            os.environ.setdefault(name, value)
        torch.cuda.set_device(device)
    store, rank, world_size = next(
        dist.rendezvous(init_method, rank, world_size, timeout=_RENDEZVOUS_TIMEOUT)
    )
    store.set_timeout(_COLLECTIVE_TIMEOUT)
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world_size, timeout=_COLLECTIVE_TIMEOUT
    )


def track_captured_collectives(graph: torch.cuda.CUDAGraph) -> None:
    """Have ``leave_group`` destroy ``graph`` (captured while this process is in a group, so
    it may hold the group's collectives) before the group's communicators; a no-op outside
    a group."""
    if dist.is_initialized():
        _CAPTURED_GRAPHS.add(graph)


def leave_group(aborting: bool) -> None:
    """Leave the default group (and the control group), after destroying the CUDA graphs that
    captured its collectives (``track_captured_collectives``; their engine is done with them).
    A failed engine's NCCL group may hold a collective that a dead rank never joins, which a
    destroy would wait for: it is aborted."""
    for graph in list(_CAPTURED_GRAPHS):
        graph.reset()  # CUDA frees a graph still replaying once the replay completes
    _CAPTURED_GRAPHS.clear()
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if aborting and abort is not None and dist.get_backend() == "nccl":
        _abort_within(abort, _ABORT_SECONDS)
    else:
        dist.destroy_process_group()


def _abort_within(abort, seconds: float) -> None:
    """``abort()`` on a daemon thread, waited for at most ``seconds``; its error is raised
    here. Past the time it is left running, with a warning."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            abort()
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
            errors.append(error)

    thread = threading.Thread(target=run, name="parallm-nccl-abort", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        logger.warning(
            "NCCL's abort of the tensor-parallel group did not finish in %g s (a rank that "
            "died may hold it); going on without it",
            seconds,
        )
    elif errors:
        raise errors[0]


def control_group() -> dist.ProcessGroup:
    """A gloo group over every rank for the driver's commands (collective: every rank calls)."""
    return dist.new_group(backend="gloo", timeout=_CONTROL_TIMEOUT)
