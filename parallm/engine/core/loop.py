"""The engine core's loop: commands in, one engine step at a time, plain outputs out.

The same loop runs in the engine-core process (``process.py``) and, for an in-process server,
on a thread (``inproc.py``); only how commands arrive and outputs leave differs.

Failure isolation: an error while adding one request rejects only that request. An error
raised by ``engine.step()`` itself cannot be pinned on one request, so every request that took
part in the step fails and is aborted; the loop goes on with the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from parallm.engine.core.messages import (
    AbortAll,
    AbortRequests,
    AddRequests,
    Command,
    CoreOutputs,
    EngineInfo,
    EngineStats,
    ProfilerReply,
    RequestFailure,
    ResetPrefixCache,
    Shutdown,
    StartProfile,
    StopProfile,
)
from parallm.engine.engine import LLMEngine
from parallm.engine.profiler import ProfilerMisuse
from parallm.engine.request import SequenceStatus
from parallm.outputs import RequestOutput

logger = logging.getLogger("parallm.engine.core")

# After a step that scheduled nothing, wait this long for a command instead of spinning.
IDLE_STEP_WAIT_S = 0.005


class EngineCoreLoop:
    """Applies commands to one ``LLMEngine``, steps it, and gathers what to report.

    Requests are added as their ``CoreRequest.stream`` says: a streamed one (the server's)
    reports its new tokens every step it progressed, another its whole output once finished.
    Commands are applied in the order they arrive. ``take_outputs`` hands over (and clears)
    what was gathered.
    """

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._live: set[str] = set()  # added, not yet finished, failed or aborted
        self._num_taken = 0
        self._pending = CoreOutputs()
        engine.step_observer = self._pending.step_num_tokens.append

    def handle(self, command: Command) -> None:
        if isinstance(command, AddRequests):
            self._add(command)
        elif isinstance(command, AbortRequests):
            for request_id in command.request_ids:
                self._live.discard(request_id)
                self.engine.abort_request(request_id)
        elif isinstance(command, AbortAll):
            self._abort_all()
        elif isinstance(command, ResetPrefixCache):
            self.engine.reset_prefix_cache()
        elif isinstance(command, StartProfile | StopProfile):
            self._profile(command)
        elif not isinstance(command, Shutdown):  # Shutdown is the driver's to act on
            raise TypeError(f"unknown engine core command {type(command).__name__}")

    def has_work(self) -> bool:
        return self.engine.has_unfinished_requests()

    def step(self) -> bool:
        """One engine step; False if it scheduled nothing."""
        steps_before = self.engine.num_steps
        try:
            outputs = self.engine.step()
        except Exception as exc:
            logger.exception("engine step failed; failing the requests that were in it")
            self._fail_step(exc)
            return True
        for out in outputs:
            if out.request_id not in self._live:
                continue  # aborted while the step ran
            if out.error is not None:  # the engine ended this request alone; fail it alone
                self._fail(out.request_id, f"RuntimeError: {out.error}")
                continue
            if out.finished:
                self._live.discard(out.request_id)
            self._pending.outputs.append(_for_the_wire(out))
        return self.engine.num_steps != steps_before

    def has_news(self) -> bool:
        """Whether anything waits to be reported."""
        p = self._pending
        return bool(
            p.outputs
            or p.aborted
            or p.rejected
            or p.failures
            or p.step_num_tokens
            or p.profiler_replies
        )

    def take_outputs(self) -> CoreOutputs:
        """What happened since the last call, with the engine's counters now."""
        taken = self._pending
        taken.num_requests_taken = self._num_taken
        taken.stats = engine_stats(self.engine)
        self._pending = CoreOutputs()
        self.engine.step_observer = self._pending.step_num_tokens.append
        return taken

    def _profile(self, command: StartProfile | StopProfile) -> None:
        """Start or stop the engine's profiler; the reply says what came of it."""
        action = "start" if isinstance(command, StartProfile) else "stop"
        try:
            if action == "start":
                self.engine.start_profile()
                reply = ProfilerReply(action)
            else:
                reply = ProfilerReply(action, trace=self.engine.stop_profile())
        except Exception as exc:
            status = 400 if isinstance(exc, ProfilerMisuse) else 500
            if status == 500:
                logger.exception("the profiler failed to %s", action)
            reply = ProfilerReply(action, error=f"{type(exc).__name__}: {exc}", status=status)
        self._pending.profiler_replies.append(reply)

    def _add(self, command: AddRequests) -> None:
        self._num_taken += len(command.requests)
        for req in command.requests:
            try:
                self.engine.add_request(
                    req.request_id, req.prompt_token_ids, req.params, prompt=req.prompt,
                    stream=req.stream, arrival_time=req.arrival_time,
                )  # fmt: skip
            except Exception as exc:
                status = 400 if isinstance(exc, ValueError) else 500
                failure = RequestFailure(req.request_id, f"{type(exc).__name__}: {exc}", status)
                self._pending.rejected.append(failure)
                continue
            self._live.add(req.request_id)

    def _abort_all(self) -> None:
        """Abort every live request, reporting each one's last output."""
        if self._live:
            logger.warning("shutting down: aborting %d unfinished requests", len(self._live))
        for request_id in list(self._live):
            try:
                out = self.engine.abort_request(request_id)
            except Exception as exc:
                logger.exception("request %s failed while being aborted", request_id)
                self._fail(request_id, f"{type(exc).__name__}: {exc}")
                continue
            self._live.discard(request_id)
            if out is not None:
                self._pending.aborted.append(_for_the_wire(out))

    def _fail_step(self, exc: Exception) -> None:
        """After ``step()`` raised: fail the requests that were in the step (running ones)."""
        for request_id in list(self._live):
            request = self.engine.requests.get(request_id)
            in_step = (
                request is None
                or request.is_finished
                or any(s.status is SequenceStatus.RUNNING for s in request.seqs)
            )
            if in_step:
                self._fail(request_id, f"{type(exc).__name__}: {exc}")

    def _fail(self, request_id: str, message: str) -> None:
        self._live.discard(request_id)
        self.engine.abort_request(request_id)
        self._pending.failures.append(RequestFailure(request_id, message, 500))


def run_core_loop(
    loop: EngineCoreLoop,
    receive: Callable[[float | None], list[Command]],
    emit: Callable[[CoreOutputs], None],
) -> None:
    """Drive ``loop`` until a ``Shutdown`` command: ``receive(wait_s)`` returns the commands
    that arrived, waiting up to ``wait_s`` seconds for the first (None: until one comes);
    ``emit`` gets the outputs after every batch of commands and every step."""
    wait_s: float | None = None
    while True:
        commands = receive(wait_s)
        for command in commands:
            if isinstance(command, Shutdown):
                return
            loop.handle(command)
        stepped = False
        if loop.has_work():
            stepped = loop.step()
            # A step that scheduled nothing would make this loop spin: wait a little for an
            # abort or a new request instead.
            wait_s = 0.0 if stepped else IDLE_STEP_WAIT_S
        else:
            wait_s = None
        if commands or stepped or loop.has_news():
            emit(loop.take_outputs())


def engine_info(engine: LLMEngine) -> EngineInfo:
    return EngineInfo(
        model=engine.config.model,
        max_model_len=engine.max_model_len,
        vocab_size=engine.model_config.vocab_size,
        max_num_seqs=engine.scheduler.cfg.max_num_seqs,
        num_blocks=engine.kv.num_blocks,
        summary=engine.summary(),
        block_size=engine.kv.block_size,
        enable_prefix_caching=engine.kv.enable_prefix_caching,
        profiling=engine.profiler is not None,
    )


def engine_stats(engine: LLMEngine) -> EngineStats:
    sched = engine.scheduler
    stats = sched.stats
    running = sched.running
    spec = engine.spec_stats
    return EngineStats(
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
        num_overlapped_steps=engine.num_overlapped_steps,
        num_prompt_tokens_computed=stats.num_prefill_tokens_computed,
        num_generated_tokens=engine.num_generated_tokens,
        spec_num_draft_tokens=spec.draft_tokens,
        spec_num_accepted_tokens=spec.accepted_tokens,
        spec_num_drafts=spec.num_proposals,
        spec_accepted_per_position=tuple(spec.accepted_per_position),
    )


def _for_the_wire(out: RequestOutput) -> RequestOutput:
    """The output as sent: without its prompt (the API process holds it), so that a delta
    carries only what is new whatever the prompt's length, and with its timings only once
    the request has finished (the server reads them then)."""
    out.prompt = None
    out.prompt_token_ids = []
    if not out.finished:
        out.metrics = None
    return out
