"""Data-parallel engine cores: N core processes, each on its own devices (the server's
replicas, and offline ``LLM(data_parallel_size=N)``'s through ``DataParallelEngine``).

``start_engine_cores`` starts one ``EngineCoreClient`` per replica (``data_parallel_size``,
through ``start_replica_cores``, which the offline engine calls with its own engine factory),
each an engine of ``tensor_parallel_size`` ranks, and waits until every one has loaded. On
CUDA, replica i sees only GPUs ``[i * tp, (i + 1) * tp)`` of this process's visible ones
(``replica_devices.replica_environments``). If any replica fails to start, the others are
stopped and its error, naming it, is raised.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

from parallm.engine.core.client import EngineCoreClient
from parallm.engine.executor import torchrun_env
from parallm.engine.replica_devices import replica_environments

# CPUs left to the API process (HTTP, tokenization, detokenization, streaming). A core whose
# torch threads take every CPU stalls each time the API process runs: an intra-op thread team
# waits for its descheduled member at every operator (vLLM's CPU backend reserves one CPU for
# its frontend for the same reason).
API_PROCESS_CPUS = 1


def start_engine_cores(
    engine_kwargs: dict[str, Any], num_threads: int | None = None
) -> list[EngineCoreClient]:
    """One loaded engine core per data-parallel replica of ``LLM(**engine_kwargs)``.

    Raises the first replica's start-up error (``ValueError`` for a bad argument, else
    ``EngineCoreError`` naming the replica) after stopping the others. ``num_threads`` (unset:
    ``core_threads``) sets each core's torch intra-op threads.
    """
    n = engine_kwargs.get("data_parallel_size", 1)
    if num_threads is None:
        num_threads = core_threads(n)
    if n == 1:
        return [EngineCoreClient(engine_kwargs, num_threads=num_threads)]
    tp = engine_kwargs.get("tensor_parallel_size", 1)
    if tp > 1 and torchrun_env() is not None:
        raise ValueError(
            f"data_parallel_size={n} cannot be combined with a tensor-parallel torchrun job "
            "(its ranks form one engine); run data parallelism within one host, without torchrun"
        )
    envs = replica_environments(engine_kwargs.get("device", "auto"), n, tp)
    return start_replica_cores({**engine_kwargs, "data_parallel_size": 1}, envs, num_threads)


def start_replica_cores(
    engine_kwargs: dict[str, Any],
    envs: list[dict[str, str]],
    num_threads: int,
    engine_factory: Callable[..., Any] | None = None,
) -> list[EngineCoreClient]:
    """One loaded engine core per entry of ``envs``, replica i started with ``envs[i]`` (its
    ``CUDA_VISIBLE_DEVICES``), each engine built from ``engine_kwargs`` (by ``engine_factory``
    if given, as ``EngineCoreClient`` does). The cores load in parallel; the first start-up
    error is raised after the others are stopped."""
    clients: list[EngineCoreClient] = []
    try:
        for replica, env in enumerate(envs):
            clients.append(EngineCoreClient(
                engine_kwargs, num_threads=num_threads, env=env, wait=False,
                replica=replica if len(envs) > 1 else None,  # one core: no replica to name
                engine_factory=engine_factory,
            ))  # fmt: skip
        _wait_until_ready(clients)
    except BaseException:
        for client in clients:
            client.stop(timeout_s=0)
        raise
    return clients


def core_threads(num_cores: int) -> int:
    """Torch intra-op threads for each of ``num_cores`` engine cores: the CPUs this process
    may run on, less ``API_PROCESS_CPUS``, shared out (at least one each)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, ((cpus or 1) - API_PROCESS_CPUS) // num_cores)


def _wait_until_ready(clients: list[EngineCoreClient]) -> None:
    """Wait for every core to load (in parallel); at the first failure, kill the cores still
    loading and raise that failure."""
    failures: list[BaseException] = []  # in the order they happened
    lock = threading.Lock()

    def wait_ready(client: EngineCoreClient) -> None:
        try:
            client.wait_ready()
        except BaseException as exc:
            with lock:
                failures.append(exc)
            raise

    with ThreadPoolExecutor(len(clients), thread_name_prefix="parallm-dp-start") as pool:
        futures = [pool.submit(wait_ready, client) for client in clients]
        wait(futures, return_when=FIRST_EXCEPTION)
        if failures:
            # A loading core reads no Shutdown; killing it ends its wait_ready at once.
            for client, future in zip(clients, futures, strict=True):
                if not future.done():
                    client.process.kill()
    if failures:
        raise failures[0]
