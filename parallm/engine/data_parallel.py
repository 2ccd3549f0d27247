"""Data parallelism: N engine replicas, each an engine core process, behind one prefix-aware
router.

``DataParallelEngine`` offers the part of ``LLMEngine``'s interface that ``LLM`` and the
offline benchmark use (``add_request``, ``abort_request``, ``step``, ``has_unfinished_requests``,
``reset_prefix_cache``, ``spec_stats``, the prompt and parameter checks, the tokenizer, the
model's vocabulary size), so that ``LLM(data_parallel_size=N)`` works as with one engine
(and ``LLM(engine_process=True)``: one replica, the engine in a process of its own). Each
replica is an engine core, the server's mechanism (``parallm.engine.core``: an ``LLMEngine``,
with its own tensor-parallel workers when ``tensor_parallel_size > 1``, stepped in its own
process behind ZeroMQ, started by ``core.replicas.start_replica_cores``). Each request goes to
the replica the ``PrefixRouter`` picks (the longest cached prefix, else the least loaded).

The cores' receiver threads put what arrives on one queue; ``step()`` drains it on the
caller's thread (so the router and the request records are touched by that thread only) and
returns what one engine's ``step()`` would: deltas of streamed requests, the whole output of
the others once finished (sent with ``CoreRequest.stream``), detokenized by the core, with
the prompt put back (the core leaves it out; timings come with a request's last output only).
A request the core fails comes back finished with ``error`` set. ``replica_stats`` and
``spec_stats`` are the counters each replica sent with its latest outputs. On CUDA, replica i
sees only its own GPUs through ``CUDA_VISIBLE_DEVICES`` (``replica_devices``, as the server's
replicas do); too few GPUs fail before any replica starts.

A replica that dies or fails makes the next ``add_request`` or ``step()`` raise a
``RuntimeError`` naming it; the other replicas are stopped, and the engine refuses further
work. Replicas exit when the engine closes (``LLM.close``, or at interpreter exit) or when this
process dies. As with any ``spawn`` start, a script that builds one at import time must guard
it with ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from parallm.config import EngineConfig, ModelConfig
from parallm.engine.core.client import EngineCoreClient
from parallm.engine.core.messages import (
    AbortRequests,
    AddRequests,
    CoreOutputs,
    CoreRequest,
    EngineStats,
    RequestFailure,
    ResetPrefixCache,
    total_stats,
)
from parallm.engine.core.replicas import core_threads, start_replica_cores
from parallm.engine.dp_router import PrefixRouter
from parallm.engine.engine import LLMEngine
from parallm.engine.replica_devices import replica_environments
from parallm.engine.spec.stats import SpecStats
from parallm.outputs import RequestOutput
from parallm.sampling_params import SamplingParams


@dataclass
class _Request:
    """A request in flight, as this process keeps it: its replica and its prompt (the core's
    outputs leave the prompt out), and its first sample's tokens so far (what its replica
    caches once it finishes, for the router)."""

    replica: int
    prompt: str | None
    prompt_token_ids: list[int]
    first_sample: list[int] = field(default_factory=list)


class DataParallelEngine:
    """Starts ``config.data_parallel_size`` engine cores and routes requests over them."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig | None = None) -> None:
        self.config = config
        self.failure: str | None = None
        self.closed = False  # close() stopped the replicas (add_request then refuses)
        self.requests: dict[str, _Request] = {}
        # Filled by the cores' receiver threads: (replica, its outputs), or (replica, why it
        # died) once it has.
        self._inbox: queue.SimpleQueue[tuple[int, CoreOutputs | str]] = queue.SimpleQueue()
        # Checked (too few GPUs) before any replica starts.
        envs = replica_environments(
            config.device, config.data_parallel_size, config.tensor_parallel_size
        )
        self.placements = [_placement(env) for env in envs]
        self.num_requests_routed = [0] * len(envs)
        replica_config = dataclasses.replace(config, data_parallel_size=1, engine_process=False)
        one_replica = {"config": replica_config, "model_config": model_config}
        self.replicas = start_replica_cores(
            one_replica, envs, core_threads(len(envs)), engine_factory=_replica_engine
        )
        try:
            for index, client in enumerate(self.replicas):
                client.start(functools.partial(self._on_outputs, index),
                             functools.partial(self._on_death, index))  # fmt: skip
        except BaseException:
            self.close()
            raise
        first = self.replicas[0]
        self.tokenizer = first.engine.tokenizer
        self.max_model_len = first.info.max_model_len
        self.model_config = first.engine.model_config  # its vocab_size, for the prompt check
        self._stats = [EngineStats(num_blocks=c.info.num_blocks) for c in self.replicas]
        self.router = PrefixRouter(
            len(envs), first.info.block_size, min(c.info.num_blocks for c in self.replicas),
            enable_prefix_caching=config.enable_prefix_caching,
        )  # fmt: skip

    @property
    def data_parallel_size(self) -> int:
        return len(self.replicas)

    # One engine's checks and argument handling, on the attributes they read; a request that
    # passes them goes to _queue_request, which routes it.
    validate_prompt = LLMEngine.validate_prompt
    validate_params = LLMEngine.validate_params
    add_request = LLMEngine.add_request

    def summary(self) -> str:
        """One line naming the replicas (process and devices), then one replica's summary."""
        if self.data_parallel_size == 1:  # LLM(engine_process=True)
            client, where = self.replicas[0], self.placements[0]
            return f"engine process (pid {client.pid} on {where}): {client.info.summary}"
        replicas = "; ".join(
            f"replica {i}: pid {client.pid} on {where}"
            for i, (client, where) in enumerate(zip(self.replicas, self.placements, strict=True))
        )
        return (
            f"data_parallel_size={self.data_parallel_size} ({replicas}), each replica: "
            f"{self.replicas[0].info.summary}"
        )

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def reset_prefix_cache(self) -> None:
        """Every replica forgets the cached prefixes no request holds
        (``LLMEngine.reset_prefix_cache``), and the router forgets them with it. Returns at
        once: a core applies commands in the order they were sent, so every request sent
        after this finds its replica's cache reset."""
        self._check_alive()
        for client in self.replicas:
            client.send(ResetPrefixCache())
        self.router.reset_prefix_cache()

    def replica_stats(self) -> list[EngineStats]:
        """Each replica's counters (scheduler, KV cache, steps, speculative decoding), as it
        sent them with its latest outputs."""
        return list(self._stats)

    @property
    def spec_stats(self) -> SpecStats:
        """The replicas' speculative-decoding counters, summed."""
        total = total_stats(self._stats)
        return SpecStats(
            total.spec_num_draft_tokens, total.spec_num_accepted_tokens, total.spec_num_drafts,
            list(total.spec_accepted_per_position),
        )  # fmt: skip

    def _queue_request(
        self, request_id: str, ids: list[int], params: SamplingParams, prompt: str | None,
        stream: bool, now: float,
    ) -> None:  # fmt: skip
        """Send the checked request to the replica the router picks."""
        self._check_alive()
        replica = self.router.route(request_id, ids)
        self.requests[request_id] = _Request(replica, prompt, ids)
        self.num_requests_routed[replica] += 1
        request = CoreRequest(request_id, ids, params, prompt, now, stream)
        self.replicas[replica].send(AddRequests([request]))

    def abort_request(self, request_id: str) -> None:
        """Stop a request on its replica; unknown ids are ignored."""
        request = self.requests.pop(request_id, None)
        if request is not None:
            self.router.finish(request_id)
            self.replicas[request.replica].send(AbortRequests([request_id]))

    def step(self) -> list[RequestOutput]:
        """Outputs the replicas have produced since the last call; waits for at least one
        message while requests are in flight."""
        self._check_alive()
        outputs: list[RequestOutput] = []
        wait = bool(self.requests)
        while True:
            try:
                replica, message = self._inbox.get() if wait else self._inbox.get_nowait()
            except queue.Empty:
                return outputs
            wait = False
            if isinstance(message, str):
                self._fail(replica, message)
            outputs.extend(self._accept(replica, message))

    def close(self) -> None:
        """Stop every replica, all at once (each closes its engine first); safe to call more
        than once."""
        self.closed = True
        self._stop_replicas()

    def _stop_replicas(self) -> None:
        with ThreadPoolExecutor(len(self.replicas)) as pool:
            list(pool.map(EngineCoreClient.stop, self.replicas))

    def _on_outputs(self, replica: int, batch: CoreOutputs) -> None:
        self._inbox.put((replica, batch))  # on the core's receiver thread

    def _on_death(self, replica: int, reason: str) -> None:
        self._inbox.put((replica, reason))  # on the core's receiver thread

    def _accept(self, replica: int, batch: CoreOutputs) -> list[RequestOutput]:
        """One engine's outputs from a replica's batch: its counters kept, failures as
        outputs with ``error``, the prompt put back; an aborted request's stragglers dropped."""
        self._stats[replica] = batch.stats
        outputs = []
        for failure in [*batch.rejected, *batch.failures]:
            if failure.request_id in self.requests:
                outputs.append(self._failed(failure))
        for out in batch.outputs:
            request = self.requests.get(out.request_id)
            if request is None:
                continue
            out.prompt, out.prompt_token_ids = request.prompt, request.prompt_token_ids
            for sample in out.outputs:
                if sample.index == 0:
                    request.first_sample.extend(sample.token_ids)
            if out.finished:
                del self.requests[out.request_id]
                self.router.finish(out.request_id, request.prompt_token_ids + request.first_sample)
            outputs.append(out)
        return outputs

    def _failed(self, failure: RequestFailure) -> RequestOutput:
        """The last output of a request the core refused or failed (as ``LLMEngine`` reports
        a failed request: finished, with ``error``)."""
        request = self.requests.pop(failure.request_id)
        self.router.finish(failure.request_id)
        return RequestOutput(
            failure.request_id, request.prompt, request.prompt_token_ids, finished=True,
            error=failure.message,
        )  # fmt: skip

    def _check_alive(self) -> None:
        if self.failure is None:
            for index, client in enumerate(self.replicas):
                if client.failure is not None:
                    self._fail(index, client.failure)
        if self.failure is not None:
            raise RuntimeError(self.failure)

    def _fail(self, index: int, detail: str) -> None:
        client = self.replicas[index]
        code = client.process.exitcode
        state = "failed" if code is None else f"exited with code {code}"
        if self.data_parallel_size == 1:  # LLM(engine_process=True)
            self.failure = (
                f"the engine process (pid {client.pid}) {state}; the engine cannot continue "
                f"(build a new one)\n--- engine process ---\n{detail}"
            )
        else:
            self.failure = (
                f"data-parallel replica {index} (pid {client.pid}) {state}; the engine cannot "
                f"continue and has stopped its other replicas (build a new one)\n"
                f"--- replica {index} ---\n{detail}"
            )
        self.requests.clear()
        self._stop_replicas()  # not close(): later requests get this failure, not "closed"
        raise RuntimeError(self.failure)


def _replica_engine(config: EngineConfig, model_config: ModelConfig | None) -> LLMEngine:
    """A replica's engine, built in its core process (``EngineCoreClient``'s
    ``engine_factory``): exactly the engine ``LLM`` builds for one replica's config."""
    return LLMEngine(config, model_config)


def _placement(env: dict[str, str]) -> str:
    """Where a replica runs, for the summary: its GPUs, or this process's devices."""
    gpus = env.get("CUDA_VISIBLE_DEVICES")
    if gpus is None:
        return "this process's devices"
    return f"GPU {gpus}" if "," not in gpus else f"GPUs {gpus}"
