"""The bridge between asyncio handlers and the engine core.

The engine core (``parallm/engine/core``) runs the step loop, by default in its own process
(``EngineCoreClient``), or on a thread of this process (``InProcessCore``, for an engine built
here). This module owns what belongs to HTTP requests: admission control, one ``RequestStream``
per HTTP request (deltas its consumer has not taken yet merged), metrics. Handlers submit
through ``submit``; outputs (deltas: every request is added with ``stream=True``) arrive once
per step on the core's delivery thread, which hands them to each event loop with one
``call_soon_threadsafe`` per loop per step, so the event loop never waits for the engine.

Data parallelism: given several engine-core clients (``parallm serve --data-parallel-size N``),
each new engine request goes to the replica that the ``PrefixRouter`` picks (the longest prefix
it caches, else the least loaded; the n samples of a request stay together as one engine
request); aborts go to the replica that holds the request, and the router is told when each
request ends (with its first sample's tokens, which that replica now caches). Each core has its
own delivery thread; they deliver one at a time. /metrics reports each replica's counters
(label ``engine``), the stats log and admission control their sums.

Failure isolation: the core fails one request alone where it can (bad input, an error in its
output processing), or the requests of a step that raised; the others go on. If the core
itself dies, every live request on it fails with a 503 naming the cause (and the replica),
the engine reports unhealthy (``error``), and the launcher stops the server, which drains the
other replicas' requests as on SIGTERM.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from parallm.engine.core.client import EngineCoreClient
from parallm.engine.core.detokenize import (
    OutputDetokenizer,
    detokenizes_here,
    without_detokenization,
)
from parallm.engine.core.inproc import InProcessCore
from parallm.engine.core.messages import (
    AbortAll,
    AbortRequests,
    AddRequests,
    CoreOutputs,
    CoreRequest,
    ProfilerReply,
    StartProfile,
    StopProfile,
    total_stats,
)
from parallm.engine.dp_router import PrefixRouter
from parallm.engine.engine import LLMEngine
from parallm.engine.profiler import ProfilerOff
from parallm.outputs import RequestOutput
from parallm.sampling_params import SamplingParams
from parallm.server.coalesce import merge_delta
from parallm.server.metrics import EngineSnapshot, ServerMetrics

logger = logging.getLogger("parallm.server")

RETRY_AFTER_S = 1


class EngineOverloaded(Exception):
    """Admission control refused the request (HTTP 429)."""


class EngineUnavailable(Exception):
    """The engine is shutting down or its core died (HTTP 503)."""


class RequestFailed(Exception):
    """One request failed inside the engine; ``status`` is the HTTP status to report."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class EngineRequest:
    """One prompt to generate for: what a handler hands to ``AsyncEngine.submit``."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)


class RequestStream:
    """Outputs of the engine requests behind one HTTP request, consumed with ``async for``.

    Each iteration yields what is new of one engine request since the consumer last took it:
    deltas that arrived while it was busy (a slow client, a busy event loop) are merged into
    one (``coalesce.merge_delta``), so a lagging stream costs one chunk per catch-up, not one
    per engine step. Always ``close()`` it (a ``finally`` does): that aborts whatever has not
    finished, which is how a client that went away gets its KV blocks back.
    """

    def __init__(self, engine: AsyncEngine, loop: asyncio.AbstractEventLoop, ids: list[str]):
        self.request_ids = ids
        self._engine = engine
        self._loop = loop
        # Merged deltas not taken yet, by engine request, in the order they first came.
        self._pending: dict[str, RequestOutput] = {}
        self._failure: RequestFailed | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._unfinished = set(ids)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while self._unfinished:
            if not self._pending:
                if self._failure is not None:
                    raise self._failure
                self._waiter = self._loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
                continue
            request_id = next(iter(self._pending))
            out = self._pending.pop(request_id)
            if out.finished:
                self._unfinished.discard(request_id)
            yield out

    def close(self) -> None:
        """Abort the engine requests that have not finished (idempotent)."""
        if self._unfinished:
            self._engine.abort(list(self._unfinished))
            self._unfinished.clear()

    def _put(self, item: RequestOutput | RequestFailed) -> None:
        """Take one delivery (on the event loop): merged into what is pending."""
        if isinstance(item, RequestFailed):
            self._failure = self._failure or item
        else:
            pending = self._pending.get(item.request_id)
            if pending is None:
                self._pending[item.request_id] = item
            else:
                merge_delta(pending, item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


@dataclass
class _Tracked:
    """Bookkeeping of one live engine request (for delivery and metrics)."""

    stream: RequestStream
    request: EngineRequest
    replica: int = 0
    last_token_time: float | None = None
    num_generation_tokens: int = 0
    # The first sample's tokens so far, for the router (data parallelism only).
    output_token_ids: list[int] = field(default_factory=list)


class AsyncEngine:
    """Serves many asyncio handlers from one engine core, or several (data parallelism).

    ``engine`` is an ``EngineCoreClient`` (the core in its own process), a sequence of them
    (one per data-parallel replica), or an ``LLMEngine`` (run on a thread here).
    ``self.engine`` is what handlers read of it: limits, tokenizer, prompt checks.
    ``max_num_waiting`` bounds the requests that are admitted but not running: beyond it (plus
    any free running slots) ``submit`` raises ``EngineOverloaded``.
    """

    def __init__(
        self,
        engine: LLMEngine | EngineCoreClient | Sequence[EngineCoreClient],
        max_num_waiting: int = 1024,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.cores = _as_cores(engine)
        self.engine = self.cores[0].engine
        self.max_num_waiting = max_num_waiting
        self.metrics = metrics
        # Inserted by submit (under the lock), removed by the delivery threads and by abort:
        # single dict operations, atomic under the GIL.
        self._tracked: dict[str, _Tracked] = {}
        self._lock = threading.Lock()
        # The delivery threads (one per core) take their cores' outputs one at a time.
        self._delivery_lock = threading.Lock()
        # The router is plain data: submit routes (event loop), delivery threads and aborts
        # finish; one at a time.
        self._route_lock = threading.Lock()
        num = len(self.cores)
        self._num_sent = [0] * num  # requests sent to each core
        self._num_taken = [0] * num  # of those, taken by the core from its inbox
        self._snapshots = [EngineSnapshot(num_blocks=c.info.num_blocks) for c in self.cores]
        self._snapshot = total_stats(self._snapshots)
        self.router = _router(self.cores) if num > 1 else None
        # With the core in its own process, text is decoded here, off its step loop (except
        # for requests with stop strings, which the core must see as text).
        tokenizer = self.engine.tokenizer
        remote = not isinstance(self.cores[0], InProcessCore)
        here = remote and tokenizer is not None
        self._detokenizer = OutputDetokenizer(tokenizer) if here else None
        self._started = False
        self._stopping = False
        self._error: str | None = None
        # Per core, the profiler commands sent and not answered yet, oldest first: the core
        # applies commands in order and answers each one (ProfilerReply).
        self._profile_waiters: list[deque[Future[ProfilerReply]]] = [deque() for _ in self.cores]

    @property
    def core(self) -> Any:
        """The first (with data parallelism: replica 0's) engine core."""
        return self.cores[0]

    # ---- called from the event loop ----------------------------------------------------------

    def start(self) -> None:
        """Start taking the cores' outputs (once)."""
        if not self._started:
            self._started = True
            for replica, core in enumerate(self.cores):
                core.start(functools.partial(self._on_outputs, replica),
                           functools.partial(self._on_death, replica))  # fmt: skip

    @property
    def is_healthy(self) -> bool:
        alive = self._started and all(core.is_alive() for core in self.cores)
        return alive and not self._stopping and self._error is None

    @property
    def error(self) -> str | None:
        """Why an engine core died (None while they live or after a clean stop)."""
        return self._error

    @property
    def snapshot(self) -> EngineSnapshot:
        """The engine's counters (with data parallelism: the replicas' summed)."""
        return self._snapshot

    @property
    def snapshots(self) -> list[EngineSnapshot]:
        """Each replica's counters (one entry without data parallelism)."""
        return list(self._snapshots)

    def replica_of(self, request_id: str) -> int | None:
        """The replica that runs a live engine request (None once it ended)."""
        tracked = self._tracked.get(request_id)
        return None if tracked is None else tracked.replica

    def submit(self, requests: list[EngineRequest]) -> RequestStream:
        """Queue the engine requests of one HTTP request; must run on the caller's event loop."""
        stream = RequestStream(self, asyncio.get_running_loop(), [r.request_id for r in requests])
        detokenizer = self._detokenizer
        here = [detokenizer is not None and detokenizes_here(r.params, detokenizer.tokenizer)
                for r in requests]  # fmt: skip
        sent = [CoreRequest(r.request_id, r.prompt_token_ids,
                            without_detokenization(r.params) if local else r.params, r.prompt,
                            r.arrival_time)
                for r, local in zip(requests, here, strict=True)]  # fmt: skip
        # Checked and sent under the lock so that nothing reaches a core after a shutdown.
        with self._lock:
            if not self.is_healthy:
                raise EngineUnavailable(self._unavailable_reason())
            self._check_new_ids(requests)
            self._admit(len(requests))
            replicas = self._route(requests)
            by_replica: dict[int, list[CoreRequest]] = defaultdict(list)
            for r, local, replica, core_request in zip(requests, here, replicas, sent,
                                                       strict=True):  # fmt: skip
                self._tracked[r.request_id] = _Tracked(stream, r, replica)
                if local:
                    detokenizer.register(r.request_id, r.prompt_token_ids, r.params)
                by_replica[replica].append(core_request)
            for replica, core_requests in by_replica.items():
                self._num_sent[replica] += len(core_requests)
                self.cores[replica].send(AddRequests(core_requests))
        if self.metrics:
            self.metrics.prompt_tokens.inc(sum(len(r.prompt_token_ids) for r in requests))
        return stream

    async def start_profile(self) -> None:
        """Start every core's profiler (vLLM's ``start_profile``); RequestFailed (400) if the
        engine was built without ``profiler_config`` or a profile is already running."""
        await self._profile(StartProfile())

    async def stop_profile(self) -> list[str]:
        """Stop every core's profiler once each has written its profile; their traces."""
        replies = await self._profile(StopProfile())
        return [r.trace for r in replies if r.trace is not None]

    async def _profile(self, command: StartProfile | StopProfile) -> list[ProfilerReply]:
        if not self.core.info.profiling:
            raise RequestFailed(str(ProfilerOff()), 400)
        futures: list[Future[ProfilerReply]] = []
        with self._lock:
            if not self.is_healthy:
                raise EngineUnavailable(self._unavailable_reason())
            for waiters, core in zip(self._profile_waiters, self.cores, strict=True):
                futures.append(Future())
                waiters.append(futures[-1])
                core.send(command)
        replies = [await asyncio.wrap_future(f) for f in futures]
        failed = [r for r in replies if r.error is not None]
        if failed:
            raise RequestFailed(failed[0].error, failed[0].status)
        return replies

    def _fail_profile_waiters(self, reason: str, replica: int | None = None) -> None:
        """Profiler commands that no reply will answer (a core died or stopped) fail with 503."""
        for i, waiters in enumerate(self._profile_waiters):
            while (replica is None or i == replica) and waiters:
                waiters.popleft().set_exception(EngineUnavailable(reason))

    def _check_new_ids(self, requests: list[EngineRequest]) -> None:
        """Engine request ids are unique among live requests, on every replica."""
        ids = [r.request_id for r in requests]
        clash = [i for i in ids if i in self._tracked] or ([] if len(set(ids)) == len(ids) else ids)
        if clash:
            raise ValueError(f"request_id {clash[0]!r} is already in flight")

    def _route(self, requests: list[EngineRequest]) -> list[int]:
        """The replica of each request (all 0 without data parallelism)."""
        if self.router is None:
            return [0] * len(requests)
        with self._route_lock:
            return [self.router.route(r.request_id, r.prompt_token_ids) for r in requests]

    def _admit(self, num_requests: int) -> None:
        """Raise EngineOverloaded if these requests would overfill the waiting queue."""
        s = self._snapshot
        free_slots = sum(
            max(0, core.info.max_num_seqs - snapshot.num_seqs_running)
            for core, snapshot in zip(self.cores, self._snapshots, strict=True)
        )
        in_flight = sum(self._num_sent) - sum(self._num_taken)
        queued = in_flight + s.num_requests_waiting + num_requests
        if queued > self.max_num_waiting + free_slots:
            if self.metrics:
                self.metrics.rejected.inc()
            raise EngineOverloaded(
                f"the server is at capacity ({s.num_requests_waiting} requests waiting, "
                f"max_num_waiting={self.max_num_waiting}); retry after {RETRY_AFTER_S}s"
            )

    def abort(self, request_ids: list[str]) -> None:
        """Abort engine requests, each on its replica; applied before that engine's next step.
        Requests that already ended are left alone."""
        by_replica: dict[int, list[str]] = defaultdict(list)
        for request_id in request_ids:
            tracked = self._untrack(request_id)
            if tracked is not None:
                by_replica[tracked.replica].append(request_id)
        num_live = sum(len(ids) for ids in by_replica.values())
        if num_live and self.metrics:
            self.metrics.aborted.inc(num_live)
        for replica, ids in by_replica.items():
            self.cores[replica].send(AbortRequests(ids))

    def abort_all(self) -> None:
        """End every live request now, each with a last output whose finish_reason is "abort",
        so that its stream closes normally (the drain deadline); later submissions get 503."""
        with self._lock:
            self._stopping = True
            for core in self.cores:
                core.send(AbortAll())

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the cores (all at once), then fail what is still live (503)."""
        with self._lock:
            self._stopping = True
        if len(self.cores) == 1:
            self.core.stop(timeout_s)
        else:
            with ThreadPoolExecutor(len(self.cores)) as pool:
                list(pool.map(lambda core: core.stop(timeout_s), self.cores))
        self._fail_profile_waiters(self._error or "the server is shutting down")
        self._fail_all(self._error or "the server is shutting down")

    def _unavailable_reason(self) -> str:
        if self._error is not None:
            return self._error
        return "the server is shutting down" if self._stopping else "the engine is not running"

    # ---- the core's delivery thread ----------------------------------------------------------

    def _on_outputs(self, replica: int, batch: CoreOutputs) -> None:
        """Take one batch of a core's outputs (on its delivery thread, one core at a time)."""
        with self._delivery_lock:
            self._take(replica, batch)

    def _take(self, replica: int, batch: CoreOutputs) -> None:
        """Counters, then deliveries."""
        self._snapshots[replica] = batch.stats
        self._snapshot = batch.stats if self.router is None else total_stats(self._snapshots)
        self._num_taken[replica] = batch.num_requests_taken
        for reply in batch.profiler_replies:
            self._profile_waiters[replica].popleft().set_result(reply)
        m = self.metrics
        if m is not None:
            for num_tokens in batch.step_num_tokens:
                m.iteration_tokens.observe(num_tokens)
        deliveries: list[tuple[RequestStream, RequestOutput | RequestFailed]] = []
        # A rejected request never ran (bad input): it does not count as failed.
        for failures, counted in ((batch.rejected, False), (batch.failures, True)):
            for failure in failures:
                tracked = self._untrack(failure.request_id)
                if tracked is None:
                    continue
                if m is not None and counted:
                    m.failed.inc()
                error = RequestFailed(failure.message, failure.status)
                deliveries.append((tracked.stream, error))
        for out in batch.aborted:
            tracked = self._tracked.get(out.request_id)
            if tracked is not None and self._decode(out):
                self._untrack(out.request_id)
                if m is not None:
                    m.aborted.inc()
                deliveries.append((tracked.stream, _with_prompt(out, tracked.request)))
        now = time.monotonic()
        num_generated = 0
        for out in batch.outputs:
            tracked = self._tracked.get(out.request_id)
            if tracked is None:
                continue  # aborted while the step ran
            if not self._decode(out):
                continue
            _with_prompt(out, tracked.request)
            try:
                num_generated += self._account(tracked, out, now)
            except Exception as exc:
                logger.exception("request %s failed while delivering output", out.request_id)
                self._fail(out.request_id, f"{type(exc).__name__}: {exc}")
                continue
            deliveries.append((tracked.stream, out))
            if self.router is not None:
                for sample in out.outputs:
                    if sample.index == 0:
                        tracked.output_token_ids.extend(sample.token_ids)
            if out.finished:
                self._untrack(out.request_id, finished=True)
        if m is not None and num_generated:
            m.generation_tokens.inc(num_generated)  # once a batch: a counter's inc takes a lock
        self._deliver_many(deliveries)

    def _decode(self, out: RequestOutput) -> bool:
        """Decode the output's text here if this process detokenizes it; False (and the
        request failed) if that raised."""
        if self._detokenizer is None:
            return True
        try:
            self._detokenizer.apply(out)
        except Exception as exc:
            logger.exception("request %s failed while decoding its output", out.request_id)
            self._fail(out.request_id, f"{type(exc).__name__}: {exc}")
            return False
        return True

    def _untrack(self, request_id: str, finished: bool = False) -> _Tracked | None:
        """Stop tracking a request (finished, failed or aborted); its entry, if it had one.
        The router learns that it no longer loads its replica, and for a finished one, that
        the replica caches its prompt and first sample."""
        if self._detokenizer is not None:
            self._detokenizer.forget(request_id)
        tracked = self._tracked.pop(request_id, None)
        if tracked is not None and self.router is not None:
            cached = None
            if finished:
                cached = [*tracked.request.prompt_token_ids, *tracked.output_token_ids]
            with self._route_lock:
                self.router.finish(request_id, cached)
        return tracked

    def _on_death(self, replica: int, reason: str) -> None:
        """A core died (``reason`` names it): its requests fail; the server stops."""
        with self._lock:
            if self._error is None:
                self._error = reason
        self._fail_profile_waiters(reason, replica)
        self._fail_all(reason, replica)

    def _account(self, tracked: _Tracked, out: RequestOutput, now: float) -> int:
        """Update the request's counters and the latency histograms for one output; the
        number of tokens it generated (the caller counts them for the batch)."""
        num_new = sum(len(c.token_ids) for c in out.outputs)
        m = self.metrics
        arrival_time = tracked.request.arrival_time
        if num_new and m is not None:
            if tracked.last_token_time is None:
                m.ttft.observe(now - arrival_time)
            else:
                m.itl.observe(now - tracked.last_token_time)
        if num_new:
            tracked.last_token_time = now
            tracked.num_generation_tokens += num_new
        if out.finished and m is not None:
            m.e2e.observe(now - arrival_time)
            m.finished(out.outputs[0].finish_reason or "unknown")
            m.request_done(out.metrics, len(out.prompt_token_ids), tracked.num_generation_tokens)
        return num_new

    def _fail(self, request_id: str, message: str) -> None:
        """Fail one request here (its output could not be delivered) and abort it in the core."""
        tracked = self._untrack(request_id)
        if tracked is not None:
            self.cores[tracked.replica].send(AbortRequests([request_id]))
            if self.metrics:
                self.metrics.failed.inc()
            self._deliver_many([(tracked.stream, RequestFailed(message, 500))])

    def _fail_all(self, reason: str, replica: int | None = None) -> None:
        """Fail every live request (of ``replica``, if given) with a 503 naming ``reason``."""
        deliveries: list[tuple[RequestStream, RequestOutput | RequestFailed]] = []
        for request_id, tracked in list(self._tracked.items()):
            if replica is not None and tracked.replica != replica:
                continue
            tracked = self._untrack(request_id)
            if tracked is None:
                continue
            if self.metrics:
                self.metrics.failed.inc()
            deliveries.append((tracked.stream, RequestFailed(f"EngineUnavailable: {reason}", 503)))
        self._deliver_many(deliveries)

    def _deliver_many(self, items: list[tuple[RequestStream, RequestOutput | RequestFailed]]):
        """Hand outputs to their event loops: one wake-up per loop per step, not per request."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for stream, item in items:
            by_loop.setdefault(stream._loop, []).append((stream, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                for stream, _ in batch:
                    self.abort(stream.request_ids)


def _as_cores(engine: Any) -> list[Any]:
    """The engine cores to serve from: the clients given, or one loop on a thread here."""
    if isinstance(engine, list | tuple):
        if not engine:
            raise ValueError("AsyncEngine needs at least one engine core, got none")
        return list(engine)
    return [engine if isinstance(engine, EngineCoreClient) else InProcessCore(engine)]


def _router(cores: list[Any]) -> PrefixRouter:
    """The data-parallel router, hashing prompts as the replicas' cache managers do."""
    info = cores[0].info
    return PrefixRouter(
        len(cores), info.block_size, min(core.info.num_blocks for core in cores),
        enable_prefix_caching=info.enable_prefix_caching,
    )  # fmt: skip


def _with_prompt(out: RequestOutput, request: EngineRequest) -> RequestOutput:
    """Put back the prompt that the core leaves out of its outputs."""
    out.prompt = request.prompt
    out.prompt_token_ids = request.prompt_token_ids
    return out


def _put_all(batch: list[tuple[RequestStream, RequestOutput | RequestFailed]]) -> None:
    for stream, item in batch:
        stream._put(item)
