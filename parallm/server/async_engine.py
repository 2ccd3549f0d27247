"""The bridge between asyncio handlers and the engine core.

The engine core (``parallm/engine/core``) runs the step loop, by default in its own process
(``EngineCoreClient``), or on a thread of this process (``InProcessCore``, for an engine built
here). This module owns what belongs to HTTP requests: admission control, one asyncio queue per
request, metrics. Handlers submit through ``submit``; outputs (deltas: every request is added
with ``stream=True``) arrive once per step on the core's delivery thread, which hands them to
each event loop with one ``call_soon_threadsafe`` per loop per step, so the event loop never
waits for the engine.

Failure isolation: the core fails one request alone where it can (bad input, an error in its
output processing), or the requests of a step that raised; the others go on. If the core
itself dies, every live request fails with a 503 naming the cause, the engine reports
unhealthy (``error``), and the launcher stops the server.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec

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
)
from parallm.engine.engine import LLMEngine
from parallm.outputs import RequestOutput
from parallm.sampling_params import SamplingParams
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

    Always ``close()`` it (a ``finally`` does): that aborts whatever has not finished, which is
    how a client that went away gets its KV blocks back.
    """

    def __init__(self, engine: AsyncEngine, loop: asyncio.AbstractEventLoop, ids: list[str]):
        self.request_ids = ids
        self._engine = engine
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput | RequestFailed] = asyncio.Queue()
        self._unfinished = set(ids)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while self._unfinished:
            item = await self._queue.get()
            if isinstance(item, RequestFailed):
                raise item
            if item.finished:
                self._unfinished.discard(item.request_id)
            yield item

    def close(self) -> None:
        """Abort the engine requests that have not finished (idempotent)."""
        if self._unfinished:
            self._engine.abort(list(self._unfinished))
            self._unfinished.clear()

    def _put(self, item: RequestOutput | RequestFailed) -> None:
        self._queue.put_nowait(item)


@dataclass
class _Tracked:
    """Bookkeeping of one live engine request (for delivery and metrics)."""

    stream: RequestStream
    request: EngineRequest
    last_token_time: float | None = None
    num_generation_tokens: int = 0


class AsyncEngine:
    """Serves many asyncio handlers from one engine core.

    ``engine`` is an ``EngineCoreClient`` (the core in its own process) or an ``LLMEngine``
    (run on a thread here). ``self.engine`` is what handlers read of it: limits, tokenizer,
    prompt checks. ``max_num_waiting`` bounds the requests that are admitted but not running:
    beyond it (plus any free running slots) ``submit`` raises ``EngineOverloaded``.
    """

    def __init__(
        self,
        engine: LLMEngine | EngineCoreClient,
        max_num_waiting: int = 1024,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.core = engine if isinstance(engine, EngineCoreClient) else InProcessCore(engine)
        self.engine = self.core.engine
        self.max_num_waiting = max_num_waiting
        self.metrics = metrics
        # Inserted by submit (under the lock), removed by the delivery thread and by abort:
        # single dict operations, atomic under the GIL.
        self._tracked: dict[str, _Tracked] = {}
        self._lock = threading.Lock()
        self._num_sent = 0  # requests sent to the core
        self._num_taken = 0  # of those, taken by the core from its inbox
        self._snapshot = EngineSnapshot(num_blocks=self.core.info.num_blocks)
        # With the core in its own process, text is decoded here, off its step loop (except
        # for requests with stop strings, which the core must see as text).
        tokenizer = self.engine.tokenizer
        remote = isinstance(self.core, EngineCoreClient)
        here = remote and tokenizer is not None
        self._detokenizer = OutputDetokenizer(tokenizer) if here else None
        self._started = False
        self._stopping = False
        self._error: str | None = None

    # ---- called from the event loop ----------------------------------------------------------

    def start(self) -> None:
        """Start taking the core's outputs (once)."""
        if not self._started:
            self._started = True
            self.core.start(self._on_outputs, self._on_death)

    @property
    def is_healthy(self) -> bool:
        alive = self._started and self.core.is_alive()
        return alive and not self._stopping and self._error is None

    @property
    def error(self) -> str | None:
        """Why the engine core died (None while it lives or after a clean stop)."""
        return self._error

    @property
    def snapshot(self) -> EngineSnapshot:
        return self._snapshot

    def submit(self, requests: list[EngineRequest]) -> RequestStream:
        """Queue the engine requests of one HTTP request; must run on the caller's event loop."""
        stream = RequestStream(self, asyncio.get_running_loop(), [r.request_id for r in requests])
        detokenizer = self._detokenizer
        here = [detokenizer is not None and detokenizes_here(r.params, detokenizer.tokenizer)
                for r in requests]  # fmt: skip
        command = AddRequests([
            CoreRequest(r.request_id, r.prompt_token_ids,
                        without_detokenization(r.params) if local else r.params, r.prompt,
                        r.arrival_time)
            for r, local in zip(requests, here, strict=True)
        ])  # fmt: skip
        # Checked and sent under the lock so that nothing reaches the core after a shutdown.
        with self._lock:
            if not self.is_healthy:
                raise EngineUnavailable(self._unavailable_reason())
            self._admit(len(requests))
            for r, local in zip(requests, here, strict=True):
                self._tracked[r.request_id] = _Tracked(stream, r)
                if local:
                    detokenizer.register(r.request_id, r.prompt_token_ids, r.params)
            self._num_sent += len(requests)
            self.core.send(command)
        if self.metrics:
            self.metrics.prompt_tokens.inc(sum(len(r.prompt_token_ids) for r in requests))
        return stream

    def _admit(self, num_requests: int) -> None:
        """Raise EngineOverloaded if these requests would overfill the waiting queue."""
        s = self._snapshot
        free_slots = max(0, self.core.info.max_num_seqs - s.num_seqs_running)
        in_flight = self._num_sent - self._num_taken
        queued = in_flight + s.num_requests_waiting + num_requests
        if queued > self.max_num_waiting + free_slots:
            if self.metrics:
                self.metrics.rejected.inc()
            raise EngineOverloaded(
                f"the server is at capacity ({s.num_requests_waiting} requests waiting, "
                f"max_num_waiting={self.max_num_waiting}); retry after {RETRY_AFTER_S}s"
            )

    def abort(self, request_ids: list[str]) -> None:
        """Abort engine requests; applied before the engine's next step."""
        num_live = sum(self._untrack(i) is not None for i in request_ids)
        if num_live and self.metrics:
            self.metrics.aborted.inc(num_live)
        self.core.send(AbortRequests(request_ids))

    def abort_all(self) -> None:
        """End every live request now, each with a last output whose finish_reason is "abort",
        so that its stream closes normally (the drain deadline); later submissions get 503."""
        with self._lock:
            self._stopping = True
            self.core.send(AbortAll())

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the core, then fail what is still live (503)."""
        with self._lock:
            self._stopping = True
        self.core.stop(timeout_s)
        self._fail_all(self._error or "the server is shutting down")

    def _unavailable_reason(self) -> str:
        if self._error is not None:
            return self._error
        return "the server is shutting down" if self._stopping else "the engine is not running"

    # ---- the core's delivery thread ----------------------------------------------------------

    def _on_outputs(self, batch: CoreOutputs) -> None:
        """Take one batch of the core's outputs: counters, then deliveries."""
        self._snapshot = EngineSnapshot(**msgspec.structs.asdict(batch.stats))
        self._num_taken = batch.num_requests_taken
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
        for out in batch.outputs:
            tracked = self._tracked.get(out.request_id)
            if tracked is None:
                continue  # aborted while the step ran
            if not self._decode(out):
                continue
            _with_prompt(out, tracked.request)
            try:
                self._account(tracked, out, now)
            except Exception as exc:
                logger.exception("request %s failed while delivering output", out.request_id)
                self._fail(out.request_id, f"{type(exc).__name__}: {exc}")
                continue
            deliveries.append((tracked.stream, out))
            if out.finished:
                self._untrack(out.request_id)
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

    def _untrack(self, request_id: str) -> _Tracked | None:
        """Stop tracking a request (finished, failed or aborted); its entry, if it had one."""
        if self._detokenizer is not None:
            self._detokenizer.forget(request_id)
        return self._tracked.pop(request_id, None)

    def _on_death(self, reason: str) -> None:
        with self._lock:
            self._error = reason
        self._fail_all(reason)

    def _account(self, tracked: _Tracked, out: RequestOutput, now: float) -> None:
        """Update token counters and latency histograms for one output."""
        num_new = sum(len(c.token_ids) for c in out.outputs)
        m = self.metrics
        arrival_time = tracked.request.arrival_time
        if num_new and m is not None:
            m.generation_tokens.inc(num_new)
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

    def _fail(self, request_id: str, message: str) -> None:
        """Fail one request here (its output could not be delivered) and abort it in the core."""
        tracked = self._untrack(request_id)
        self.core.send(AbortRequests([request_id]))
        if tracked is not None:
            if self.metrics:
                self.metrics.failed.inc()
            self._deliver_many([(tracked.stream, RequestFailed(message, 500))])

    def _fail_all(self, reason: str) -> None:
        """Fail every live request with a 503 naming ``reason``."""
        deliveries: list[tuple[RequestStream, RequestOutput | RequestFailed]] = []
        for request_id in list(self._tracked):
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


def _with_prompt(out: RequestOutput, request: EngineRequest) -> RequestOutput:
    """Put back the prompt that the core leaves out of its outputs."""
    out.prompt = request.prompt
    out.prompt_token_ids = request.prompt_token_ids
    return out


def _put_all(batch: list[tuple[RequestStream, RequestOutput | RequestFailed]]) -> None:
    for stream, item in batch:
        stream._put(item)
