"""The bridge between asyncio handlers and the synchronous ``LLMEngine``.

One background thread owns the engine and runs the step loop; nothing else touches the engine's
mutable state. Handlers submit work through a thread-safe inbox and get their outputs (deltas,
since every request is added with ``stream=True``) on a per-request asyncio queue, fed with
``loop.call_soon_threadsafe`` once per step, so the event loop never waits for the engine.

Failure isolation: an error while adding or delivering one request fails only that request. An
error raised by ``engine.step()`` itself cannot be pinned on one request, so every request that
took part in the step fails and is aborted; the loop goes on with the others.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from parallm.engine.engine import LLMEngine
from parallm.engine.request import SequenceStatus
from parallm.outputs import RequestOutput
from parallm.sampling_params import SamplingParams
from parallm.server.metrics import EngineSnapshot, ServerMetrics

logger = logging.getLogger("parallm.server")

RETRY_AFTER_S = 1
_IDLE_STEP_WAIT_S = 0.005


class EngineOverloaded(Exception):
    """Admission control refused the request (HTTP 429)."""


class EngineUnavailable(Exception):
    """The engine is shutting down or its loop died (HTTP 503)."""


class RequestFailed(Exception):
    """One request failed inside the engine thread; ``status`` is the HTTP status to report."""

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
    """Engine-thread bookkeeping of one live engine request (for delivery and metrics)."""

    stream: RequestStream
    arrival_time: float
    last_token_time: float | None = None
    num_generation_tokens: int = 0


@dataclass
class _Add:
    stream: RequestStream
    requests: list[EngineRequest]


@dataclass
class _Abort:
    request_ids: list[str]


_STOP = object()
_ABORT_ALL = object()


class AsyncEngine:
    """Runs ``LLMEngine`` in a background thread and serves many asyncio handlers.

    ``max_num_waiting`` bounds the requests that are admitted but not running: beyond it (plus
    any free running slots) ``submit`` raises ``EngineOverloaded``.
    """

    def __init__(
        self, engine: LLMEngine, max_num_waiting: int = 1024, metrics: ServerMetrics | None = None
    ) -> None:
        self.engine = engine
        self.max_num_waiting = max_num_waiting
        self.metrics = metrics
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._tracked: dict[str, _Tracked] = {}
        self._lock = threading.Lock()
        self._num_pending = 0  # submitted, not yet taken from the inbox
        self._snapshot = EngineSnapshot(num_blocks=engine.kv.num_blocks)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._error: BaseException | None = None

    # ---- called from the event loop ----------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="parallm-engine", daemon=True)
            self._thread.start()

    @property
    def is_healthy(self) -> bool:
        alive = self._thread is not None and self._thread.is_alive()
        return alive and not self._stopping and self._error is None

    @property
    def snapshot(self) -> EngineSnapshot:
        return self._snapshot

    def submit(self, requests: list[EngineRequest]) -> RequestStream:
        """Queue the engine requests of one HTTP request; must run on the caller's event loop."""
        stream = RequestStream(self, asyncio.get_running_loop(), [r.request_id for r in requests])
        # Checked and queued under the lock so that nothing lands in the inbox after _STOP.
        with self._lock:
            if not self.is_healthy:
                raise EngineUnavailable(self._unavailable_reason())
            self._admit(len(requests))
            self._num_pending += len(requests)
            self._inbox.put(_Add(stream, requests))
        return stream

    def _admit(self, num_requests: int) -> None:
        """Raise EngineOverloaded if these requests would overfill the waiting queue."""
        s = self._snapshot
        free_slots = max(0, self.engine.scheduler.cfg.max_num_seqs - s.num_seqs_running)
        queued = self._num_pending + s.num_requests_waiting + num_requests
        if queued > self.max_num_waiting + free_slots:
            if self.metrics:
                self.metrics.rejected.inc()
            raise EngineOverloaded(
                f"the server is at capacity ({s.num_requests_waiting} requests waiting, "
                f"max_num_waiting={self.max_num_waiting}); retry after {RETRY_AFTER_S}s"
            )

    def abort(self, request_ids: list[str]) -> None:
        """Abort engine requests; applied before the engine's next step."""
        self._inbox.put(_Abort(request_ids))

    def abort_all(self) -> None:
        """End every live request now, each with a last output whose finish_reason is "abort",
        so that its stream closes normally (the drain deadline); later submissions get 503."""
        with self._lock:
            self._stopping = True
            self._inbox.put(_ABORT_ALL)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the loop, fail what is still live (503) and join the thread."""
        with self._lock:
            self._stopping = True
            self._inbox.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _unavailable_reason(self) -> str:
        if self._error is not None:
            return f"the engine loop died: {self._error!r}"
        return "the server is shutting down" if self._stopping else "the engine is not running"

    # ---- the engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            wait_s: float | None = None  # None: nothing to do, block until told something
            while self._handle_inbox(wait_s):
                if not self.engine.has_unfinished_requests():
                    wait_s = None
                    continue
                # A step that scheduled nothing would make this loop spin: wait a little for
                # an abort or a new request instead.
                wait_s = 0.0 if self._step() else _IDLE_STEP_WAIT_S
        except BaseException as exc:  # a bug in this loop: say so everywhere, then stop
            logger.exception("engine loop died")
            with self._lock:
                self._error = exc
        finally:
            reason = "the server is shutting down" if self._error is None else repr(self._error)
            self._fail_all(reason)

    def _fail_all(self, reason: str) -> None:
        """Fail every live request and every submission still in the inbox with a 503."""
        for request_id in list(self._tracked):
            self._fail(request_id, EngineUnavailable(reason), status=503)
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Add):
                self._deliver(item.stream, RequestFailed(reason, status=503))
        self._publish()

    def _handle_inbox(self, wait_s: float | None) -> bool:
        """Apply queued adds and aborts, waiting up to ``wait_s`` for the first (None: no
        limit); False once asked to stop."""
        try:
            item = self._inbox.get_nowait() if wait_s == 0 else self._inbox.get(timeout=wait_s)
        except queue.Empty:
            return True
        while True:
            if item is _STOP:
                return False
            if isinstance(item, _Add):
                self._add(item)
            elif item is _ABORT_ALL:
                self._end_all()
            else:
                for request_id in item.request_ids:
                    self._abort(request_id)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                self._publish()
                return True

    def _add(self, item: _Add) -> None:
        with self._lock:
            self._num_pending -= len(item.requests)
        for req in item.requests:
            try:
                self.engine.add_request(
                    req.request_id, req.prompt_token_ids, req.params, prompt=req.prompt,
                    stream=True, arrival_time=req.arrival_time,
                )  # fmt: skip
            except Exception as exc:
                status = 400 if isinstance(exc, ValueError) else 500
                self._deliver(item.stream, RequestFailed(f"{type(exc).__name__}: {exc}", status))
                continue
            self._tracked[req.request_id] = _Tracked(item.stream, req.arrival_time)
            if self.metrics:
                self.metrics.prompt_tokens.inc(len(req.prompt_token_ids))

    def _abort(self, request_id: str) -> None:
        if self._tracked.pop(request_id, None) is not None and self.metrics:
            self.metrics.aborted.inc()
        self.engine.abort_request(request_id)

    def _end_all(self) -> None:
        """Abort every live request, handing each stream the request's last output."""
        if self._tracked:
            logger.warning("shutting down: aborting %d unfinished requests", len(self._tracked))
        deliveries: list[tuple[RequestStream, RequestOutput]] = []
        for request_id, tracked in list(self._tracked.items()):
            try:
                out = self.engine.abort_request(request_id)
            except Exception as exc:
                logger.exception("request %s failed while being aborted", request_id)
                self._fail(request_id, exc)
                continue
            del self._tracked[request_id]
            if self.metrics:
                self.metrics.aborted.inc()
            if out is not None:
                deliveries.append((tracked.stream, out))
        self._deliver_many(deliveries)

    def _step(self) -> bool:
        """One engine step and the delivery of its outputs; False if nothing was scheduled."""
        steps_before = self.engine.num_steps
        try:
            outputs = self.engine.step()
        except Exception as exc:
            logger.exception("engine step failed; failing the requests that were in it")
            self._fail_step(exc)
            self._publish()
            return True
        self._publish()
        now = time.monotonic()
        deliveries: list[tuple[RequestStream, RequestOutput]] = []
        for out in outputs:
            tracked = self._tracked.get(out.request_id)
            if tracked is None:
                continue  # aborted while the step ran
            if out.error is not None:  # the engine ended this request alone; fail it alone
                self._fail(out.request_id, RuntimeError(out.error))
                continue
            try:
                self._account(tracked, out, now)
            except Exception as exc:
                logger.exception("request %s failed while delivering output", out.request_id)
                self._fail(out.request_id, exc)
                continue
            deliveries.append((tracked.stream, out))
            if out.finished:
                del self._tracked[out.request_id]
        self._deliver_many(deliveries)
        return self.engine.num_steps != steps_before

    def _account(self, tracked: _Tracked, out: RequestOutput, now: float) -> None:
        """Update token counters and latency histograms for one output."""
        num_new = sum(len(c.token_ids) for c in out.outputs)
        m = self.metrics
        if num_new and m is not None:
            m.generation_tokens.inc(num_new)
            if tracked.last_token_time is None:
                m.ttft.observe(now - tracked.arrival_time)
            else:
                m.itl.observe(now - tracked.last_token_time)
        if num_new:
            tracked.last_token_time = now
            tracked.num_generation_tokens += num_new
        if out.finished and m is not None:
            m.e2e.observe(now - tracked.arrival_time)
            m.finished(out.outputs[0].finish_reason or "unknown")
            m.request_done(out.metrics, len(out.prompt_token_ids), tracked.num_generation_tokens)

    def _fail_step(self, exc: Exception) -> None:
        """After ``step()`` raised: fail the requests that were in the step (running ones)."""
        for request_id in list(self._tracked):
            request = self.engine.requests.get(request_id)
            in_step = (
                request is None
                or request.is_finished
                or any(s.status is SequenceStatus.RUNNING for s in request.seqs)
            )
            if in_step:
                self._fail(request_id, exc)

    def _fail(self, request_id: str, exc: BaseException, status: int = 500) -> None:
        tracked = self._tracked.pop(request_id, None)
        self.engine.abort_request(request_id)
        if tracked is not None:
            if self.metrics:
                self.metrics.failed.inc()
            self._deliver(tracked.stream, RequestFailed(f"{type(exc).__name__}: {exc}", status))

    def _publish(self) -> None:
        """Replace the snapshot that metrics and admission control read."""
        engine = self.engine
        sched = engine.scheduler
        stats = sched.stats
        running = sched.running
        snapshot = EngineSnapshot(
            num_requests_running=len({s.request_id for s in running}),
            num_requests_waiting=len({s.request_id for s in sched.waiting}),
            num_seqs_running=len(running),
            num_blocks=engine.kv.num_blocks,
            num_blocks_in_use=engine.kv.num_blocks - engine.kv.num_free_blocks,
            num_cached_blocks=engine.kv.num_cached_blocks,
            prefix_cache_queries=stats.num_prefix_cache_queried_tokens,
            prefix_cache_hits=stats.num_prefix_cache_hit_tokens,
            num_preemptions=stats.num_preemptions,
            num_steps=engine.num_steps,
            num_prompt_tokens_computed=stats.num_prefill_tokens_computed,
            num_generated_tokens=engine.num_generated_tokens,
            spec_num_draft_tokens=engine.spec_stats.draft_tokens,
            spec_num_accepted_tokens=engine.spec_stats.accepted_tokens,
            spec_num_drafts=engine.spec_stats.num_proposals,
            spec_accepted_per_position=tuple(engine.spec_stats.accepted_per_position),
        )
        with self._lock:
            self._snapshot = snapshot

    def _deliver(self, stream: RequestStream, item: RequestOutput | RequestFailed) -> None:
        self._deliver_many([(stream, item)])

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
                    for request_id in stream.request_ids:
                        self._abort(request_id)


def _put_all(batch: list[tuple[RequestStream, RequestOutput | RequestFailed]]) -> None:
    for stream, item in batch:
        stream._put(item)
