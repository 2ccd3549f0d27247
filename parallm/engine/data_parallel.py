"""Data parallelism: N engine replicas, one process each, behind one prefix-aware router.

``DataParallelEngine`` offers the part of ``LLMEngine``'s interface that ``LLM`` and the
offline benchmark use (``add_request``, ``abort_request``, ``step``, ``has_unfinished_requests``,
``reset_prefix_cache``, ``spec_stats``, the prompt and parameter checks, the tokenizer, the
model config), so that ``LLM(data_parallel_size=N)`` works as with one engine. Each request
goes to the replica the ``PrefixRouter`` picks (the longest cached prefix, else the least
loaded); each replica runs its own ``LLMEngine`` (with its own tensor-parallel workers when
``tensor_parallel_size > 1``) in a spawned process with a small command loop, and sends back
what its ``step()`` returns (finished requests, and deltas of streamed ones). On CUDA, replica
i sees only its own GPUs through ``CUDA_VISIBLE_DEVICES`` (``replica_devices``, as the
server's replicas do); too few GPUs fail before any replica starts.

A replica that dies or fails makes the next ``step()`` raise a ``RuntimeError`` naming it;
the other replicas are stopped, and the engine refuses further work. Replicas exit when the
engine closes (``LLM.close``, or at interpreter exit) or when their pipe to it closes (this
process died). As with any ``spawn`` start, a script that builds one at import time must
guard it with ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import multiprocessing as mp
import os
import signal
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

import torch

from parallm.config import EngineConfig, ModelConfig
from parallm.engine.dp_router import PrefixRouter
from parallm.engine.engine import LLMEngine
from parallm.engine.replica_devices import replica_environments
from parallm.engine.spec.stats import SpecStats
from parallm.outputs import RequestOutput
from parallm.sampling_params import SamplingParams

_STOP_SECONDS = 10.0


@dataclass
class ReplicaInfo:
    """What a replica reports once its engine is loaded (picklable)."""

    model_config: ModelConfig
    max_model_len: int
    num_blocks: int
    block_size: int
    summary: str
    tokenizer: Any


class DataParallelEngine:
    """Starts ``config.data_parallel_size`` replicas and routes requests over them."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig | None = None) -> None:
        self.config = config
        self.failure: str | None = None
        self._closed = False
        self.replicas: list[BaseProcess] = []
        self.conns: list[Connection] = []
        self.requests: dict[str, int] = {}  # in flight: request id -> replica
        # Outputs read while waiting for the replicas' answers to a query; step() returns them.
        self._buffered: list[RequestOutput] = []
        # Checked (too few GPUs) before any replica starts.
        envs = replica_environments(
            config.device, config.data_parallel_size, config.tensor_parallel_size
        )
        self.placements = [_placement(env) for env in envs]
        self.num_requests_routed = [0] * len(envs)
        one_replica = dataclasses.replace(config, data_parallel_size=1)
        atexit.register(self.close)
        try:
            ctx = mp.get_context("spawn")
            threads = max(1, (os.cpu_count() or 1) // len(envs))
            for index, env in enumerate(envs):
                parent, child = ctx.Pipe()
                proc = ctx.Process(
                    target=_replica_main, args=(one_replica, model_config, child, threads, env),
                    daemon=False, name=f"parallm-dp-replica{index}",
                )  # fmt: skip
                proc.start()
                child.close()
                self.replicas.append(proc)
                self.conns.append(parent)
            infos = [self._expect_ready(i) for i in range(len(envs))]
        except BaseException:
            self.close()
            raise
        info = infos[0]
        self.model_config = info.model_config
        self.max_model_len = info.max_model_len
        self.tokenizer = info.tokenizer
        self._summary = info.summary
        self.router = PrefixRouter(
            len(envs), info.block_size, min(i.num_blocks for i in infos),
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
        replicas = "; ".join(
            f"replica {i}: pid {proc.pid} on {where}"
            for i, (proc, where) in enumerate(zip(self.replicas, self.placements, strict=True))
        )
        return (
            f"data_parallel_size={self.data_parallel_size} ({replicas}), each replica: "
            f"{self._summary}"
        )

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests or self._buffered)

    def reset_prefix_cache(self) -> None:
        """Every replica forgets the cached prefixes no request holds
        (``LLMEngine.reset_prefix_cache``), and the router forgets them with it; returns once
        all replicas have."""
        self._ask_all("reset_prefix_cache")
        self.router.reset_prefix_cache()

    def replica_stats(self) -> list[dict[str, float]]:
        """Each replica's ``LLMEngine.stats`` (its scheduler, KV cache and step counters)."""
        return self._ask_all("stats")

    @property
    def spec_stats(self) -> SpecStats:
        """The replicas' speculative-decoding counters, summed."""
        return _sum_spec_stats(self._ask_all("spec_stats"))

    def _queue_request(
        self, request_id: str, ids: list[int], params: SamplingParams, prompt: str | None,
        stream: bool, now: float,
    ) -> None:  # fmt: skip
        """Send the checked request to the replica the router picks."""
        self._check_alive()
        replica = self.router.route(request_id, ids)
        self.requests[request_id] = replica
        self.num_requests_routed[replica] += 1
        self._send(replica, ("add", request_id, ids, params, prompt, stream, now))

    def abort_request(self, request_id: str) -> None:
        """Stop a request on its replica; unknown ids are ignored."""
        replica = self.requests.pop(request_id, None)
        if replica is None:
            return
        self.router.finish(request_id)
        if self.failure is None:
            with contextlib.suppress(OSError):  # a dead replica is reported by step()
                self.conns[replica].send(("abort", request_id))

    def step(self) -> list[RequestOutput]:
        """Outputs the replicas have produced since the last call; waits for at least one
        message while requests are in flight."""
        self._check_alive()
        if self._buffered:
            outputs, self._buffered = self._buffered, []
            return outputs
        if not self.requests:
            return []
        by_sentinel = {proc.sentinel: i for i, proc in enumerate(self.replicas)}
        ready = wait([*self.conns, *by_sentinel])
        outputs: list[RequestOutput] = []
        for index, conn in enumerate(self.conns):
            while conn in ready and conn.poll(0):
                try:
                    message = conn.recv()
                except EOFError:
                    self._fail(index)
                if message[0] == "error":
                    self._fail(index, message[1])
                outputs.extend(self._accept(message[1]))
        for sentinel in ready:
            if sentinel in by_sentinel:
                self._fail(by_sentinel[sentinel])
        return outputs

    def close(self) -> None:
        """Stop every replica (each closes its engine first); safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(("close",))
        for proc in self.replicas:
            proc.join(_STOP_SECONDS)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()

    def _accept(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """Outputs of requests still in flight (an aborted one's stragglers are dropped)."""
        kept = []
        for out in outputs:
            if out.request_id not in self.requests:
                continue
            kept.append(out)
            if out.finished:
                del self.requests[out.request_id]
                sample = out.outputs[0].token_ids if out.outputs else []
                self.router.finish(out.request_id, list(out.prompt_token_ids) + list(sample))
        return kept

    def _ask_all(self, query: str) -> list[Any]:
        """Every replica's answer to ``query`` (a key of ``_QUERIES``), in replica order.
        Each replica answers between two steps; outputs it sent before are kept for step()."""
        self._check_alive()
        for replica in range(self.data_parallel_size):
            self._send(replica, ("query", query))
        return [self._answer(replica) for replica in range(self.data_parallel_size)]

    def _answer(self, index: int) -> Any:
        conn = self.conns[index]
        while True:
            try:
                message = conn.recv()
            except EOFError:
                self._fail(index)
            if message[0] == "answer":
                return message[1]
            if message[0] == "error":
                self._fail(index, message[1])
            self._buffered.extend(self._accept(message[1]))

    def _send(self, replica: int, message: tuple) -> None:
        try:
            self.conns[replica].send(message)
        except OSError:
            self._fail(replica)

    def _check_alive(self) -> None:
        if self.failure is not None:
            raise RuntimeError(self.failure)

    def _expect_ready(self, index: int) -> ReplicaInfo:
        conn = self.conns[index]
        try:
            message = conn.recv()
        except EOFError:
            self._fail(index, when=" while loading its engine")
        if message[0] == "ready":
            return message[1]
        _, error_type, error, tb = message
        self.close()
        if error_type == "ValueError":  # a bad argument, as one engine would raise it
            raise ValueError(error)
        raise RuntimeError(f"data-parallel replica {index} failed to load its engine:\n{tb}")

    def _fail(self, index: int, detail: str | None = None, when: str = "") -> None:
        proc = self.replicas[index]
        proc.join(0.1)
        state = "failed" if proc.is_alive() else f"exited with code {proc.exitcode}"
        message = (
            f"data-parallel replica {index} (pid {proc.pid}) {state}{when}; the engine "
            "cannot continue and has stopped its other replicas (build a new one)"
        )
        if detail:
            message += f"\n--- replica {index} ---\n{detail}"
        self.failure = message
        self.requests.clear()
        self.close()
        raise RuntimeError(message)


def _placement(env: dict[str, str]) -> str:
    """Where a replica runs, for the summary: its GPUs, or this process's devices."""
    gpus = env.get("CUDA_VISIBLE_DEVICES")
    if gpus is None:
        return "this process's devices"
    return f"GPU {gpus}" if "," not in gpus else f"GPUs {gpus}"


def _sum_spec_stats(parts: list[SpecStats]) -> SpecStats:
    total = SpecStats()
    for part in parts:
        total.draft_tokens += part.draft_tokens
        total.accepted_tokens += part.accepted_tokens
        total.num_proposals += part.num_proposals
        positions = total.accepted_per_position
        positions += [0] * max(0, len(part.accepted_per_position) - len(positions))
        for i, count in enumerate(part.accepted_per_position):
            positions[i] += count
    return total


def _replica_main(
    config: EngineConfig, model_config: ModelConfig | None, conn: Connection, threads: int,
    env: dict[str, str],
) -> None:  # fmt: skip
    """A replica's life: load the engine, then take commands and step until closed. ``env``
    (its ``CUDA_VISIBLE_DEVICES``) is set first: CUDA reads it when first used, later than the
    imports that brought us here; its tensor-parallel workers inherit it."""
    os.environ.update(env)
    # The parent decides when replicas stop (a Ctrl-C reaches the whole process group; the
    # parent then aborts its requests); they also exit when its end of the pipe closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(threads)
    try:
        engine = LLMEngine(config, model_config)
    except BaseException as e:
        with contextlib.suppress(OSError):
            conn.send(("failed", type(e).__name__, str(e), traceback.format_exc()))
        return
    try:
        conn.send(("ready", _info(engine)))
        _serve(engine, conn)
    except EOFError:
        pass  # the parent is gone
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
        raise SystemExit(1) from None
    finally:
        engine.close()


def _info(engine: LLMEngine) -> ReplicaInfo:
    return ReplicaInfo(
        engine.model_config, engine.max_model_len, engine.kv.num_blocks, engine.kv.block_size,
        engine.summary(), engine.tokenizer,
    )  # fmt: skip


def _serve(engine: LLMEngine, conn: Connection) -> None:
    """Apply the parent's commands, blocking for them only while idle; step otherwise."""
    while True:
        while conn.poll(None if not engine.has_unfinished_requests() else 0):
            message = conn.recv()
            if message[0] == "add":
                engine.add_request(*message[1:])
            elif message[0] == "abort":
                engine.abort_request(message[1])
            elif message[0] == "query":
                conn.send(("answer", _QUERIES[message[1]](engine)))
            elif message[0] == "close":
                return
        outputs = engine.step()
        if outputs:
            conn.send(("outputs", outputs))


# What the parent may ask a replica between two steps (DataParallelEngine._ask_all).
_QUERIES: dict[str, Callable[[LLMEngine], Any]] = {
    "reset_prefix_cache": LLMEngine.reset_prefix_cache,
    "spec_stats": lambda engine: engine.spec_stats,
    "stats": lambda engine: engine.stats,
}
