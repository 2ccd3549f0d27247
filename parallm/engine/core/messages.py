"""Every message between the API process and the engine core: plain msgspec structs.

Requests go in as token ids and ``SamplingParams`` (a plain dataclass, encoded field by field);
outputs come back once per step as ``RequestOutput`` deltas (new token ids, text, logprobs,
finish reasons; for a request sent with ``stream=False``, its whole output once) without the
prompt, which the API process already holds, plus a snapshot of the engine's counters for
/metrics and admission control. Nothing here is pickled except the tokenizer, once, at
start-up.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from parallm.outputs import CompletionOutput, RequestOutput
from parallm.sampling_params import SamplingParams

# ---- API process -> core ---------------------------------------------------------------------


class CoreRequest(msgspec.Struct, array_like=True):
    """One engine request. ``arrival_time`` is ``time.monotonic()`` in the API process (the
    clock is system-wide, so the core's request metrics use it as is). ``stream``: report
    the new tokens of every step (the server's way); False reports the request once, whole,
    when it finishes (``LLM.generate``'s way, as the in-process engine does)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    arrival_time: float = 0.0
    stream: bool = True


class AddRequests(msgspec.Struct, tag=True, array_like=True):
    requests: list[CoreRequest]


class AbortRequests(msgspec.Struct, tag=True, array_like=True):
    request_ids: list[str]


class AbortAll(msgspec.Struct, tag=True, array_like=True):
    """End every live request with a last output whose finish_reason is "abort"."""


class ResetPrefixCache(msgspec.Struct, tag=True, array_like=True):
    """Forget every cached prefix that no request holds (``LLMEngine.reset_prefix_cache``).
    Not acknowledged: the core applies commands in the order they were sent, so requests sent
    after it find the cache reset."""


class StartProfile(msgspec.Struct, tag=True, array_like=True):
    """Start recording the engine's steps (``LLMEngine.start_profile``); answered by a
    ``ProfilerReply`` in the next ``CoreOutputs``."""


class StopProfile(msgspec.Struct, tag=True, array_like=True):
    """Stop recording and write the profile; answered by a ``ProfilerReply`` with its path."""


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    """Stop the loop, close the engine (and its tensor-parallel workers) and exit."""


Command = (
    AddRequests
    | AbortRequests
    | AbortAll
    | ResetPrefixCache
    | StartProfile
    | StopProfile
    | Shutdown
)

# ---- core -> API process ---------------------------------------------------------------------


class EngineStats(msgspec.Struct, array_like=True, frozen=True):
    """One engine's counters after a step: sent by the core with every ``CoreOutputs``, and
    read by the server's /metrics, stats log and admission control (``EngineSnapshot`` there).
    Replaced, never mutated."""

    num_requests_running: int = 0
    num_requests_waiting: int = 0
    num_seqs_running: int = 0
    num_blocks: int = 0
    num_blocks_in_use: int = 0
    num_cached_blocks: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    num_steps: int = 0
    # Steps launched before the previous step's tokens reached the host (async scheduling):
    # the others left the device idle while the host scheduled them.
    num_overlapped_steps: int = 0
    # Prompt tokens run through the model (prefix-cache hits excluded, recomputation included).
    num_prompt_tokens_computed: int = 0
    num_generated_tokens: int = 0
    # Speculative decoding: drafts proposed (scheduled), kept, and kept by draft position.
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_num_drafts: int = 0
    spec_accepted_per_position: tuple[int, ...] = ()

    @property
    def kv_cache_usage(self) -> float:
        return self.num_blocks_in_use / self.num_blocks if self.num_blocks else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        if not self.prefix_cache_queries:
            return 0.0
        return self.prefix_cache_hits / self.prefix_cache_queries


def total_stats(stats: Sequence[EngineStats]) -> EngineStats:
    """The counters of several engines (data-parallel replicas) as one: every count summed,
    so the KV cache usage is the blocks in use over all blocks."""
    fields = {
        name: sum(getattr(s, name) for s in stats)
        for name in EngineStats.__struct_fields__
        if name != "spec_accepted_per_position"
    }
    per_position = [0] * max((len(s.spec_accepted_per_position) for s in stats), default=0)
    for s in stats:
        for position, value in enumerate(s.spec_accepted_per_position):
            per_position[position] += value
    return EngineStats(**fields, spec_accepted_per_position=tuple(per_position))


class RequestFailure(msgspec.Struct, array_like=True):
    """One request that the core ended with an error; ``status`` is the HTTP status."""

    request_id: str
    message: str
    status: int = 500


class ProfilerReply(msgspec.Struct, array_like=True):
    """The core's answer to ``StartProfile`` or ``StopProfile`` (``action``: "start" or
    "stop"): the trace written by a stop, or why the command failed and the HTTP status that
    says whose fault it was (400: a profile already running, none running, profiling off)."""

    action: str
    trace: str | None = None
    error: str | None = None
    status: int = 200


class TokenDeltas(msgspec.Struct, array_like=True):
    """Outputs that carry nothing but new token ids of a request's one sample (index 0): no
    text, logprobs, finish, metrics or error. Most of a step's outputs are such; sent as
    columns, they cost a fraction of a ``RequestOutput`` each to pack and unpack."""

    request_ids: list[str] = []
    token_ids: list[list[int]] = []
    num_cached_tokens: list[int] = []


class CoreOutputs(msgspec.Struct, tag=True, array_like=True):
    """What happened since the last message: sent after every step and every batch of commands.

    ``outputs``: deltas of streamed requests that progressed, whole outputs of the others
    that finished (``prompt`` and ``prompt_token_ids`` left empty, ``metrics`` only on a
    request's last output). ``aborted``: last outputs of the requests ``AbortAll`` ended.
    ``rejected``: requests the engine refused to add (bad input). ``failures``: requests that
    failed while running. ``num_requests_taken``: how many requests the core has taken from
    its inbox in all (the API process counts what it sent, so it knows what is still in
    flight). ``step_num_tokens``: the token count of each step launched.
    """

    outputs: list[RequestOutput] = []
    aborted: list[RequestOutput] = []
    rejected: list[RequestFailure] = []
    failures: list[RequestFailure] = []
    num_requests_taken: int = 0
    step_num_tokens: list[int] = []
    profiler_replies: list[ProfilerReply] = []
    stats: EngineStats = msgspec.field(default_factory=EngineStats)
    # On the wire only: ``encode`` moves the token-only outputs here and the decoder moves
    # them back into ``outputs`` (first; a batch holds one output per request at most).
    token_deltas: TokenDeltas = msgspec.field(default_factory=TokenDeltas)


class EngineInfo(msgspec.Struct, array_like=True):
    """What the API process needs to know of the engine it serves."""

    model: str | None
    max_model_len: int
    vocab_size: int
    max_num_seqs: int
    num_blocks: int
    summary: str
    # What the server's data-parallel router needs to hash prompts as the cache manager does.
    block_size: int = 16
    enable_prefix_caching: bool = True
    # Whether the engine was built with a profiler_config (/start_profile, /stop_profile).
    profiling: bool = False


class Ready(msgspec.Struct, tag=True, array_like=True):
    """The core loaded its engine and is listening. ``tokenizer`` is the engine's tokenizer
    pickled (None without one), so that the API process tokenizes exactly as the engine would
    (chat template included)."""

    info: EngineInfo
    tokenizer: bytes | None
    pid: int


class StartupFailed(msgspec.Struct, tag=True, array_like=True):
    """Building the engine raised; ``error_type`` is the exception's class name."""

    error_type: str
    message: str
    traceback: str


class CoreFailed(msgspec.Struct, tag=True, array_like=True):
    """The core's loop raised (a bug) and the core is exiting."""

    message: str


CoreMessage = CoreOutputs | Ready | StartupFailed | CoreFailed


def encode(message: Command | CoreMessage) -> bytes:
    """msgpack bytes of one message (msgspec's module-level encoder is thread-safe)."""
    if isinstance(message, CoreOutputs):
        message = _with_token_deltas(message)
    return msgspec.msgpack.encode(message)


def _is_token_delta(out: RequestOutput) -> bool:
    if len(out.outputs) != 1 or out.finished or out.error is not None:
        return False
    if out.metrics is not None or out.prompt_logprobs is not None or out.prompt is not None:
        return False
    s = out.outputs[0]
    return (
        s.index == 0 and s.text == "" and s.logprobs is None and s.cumulative_logprob is None
        and s.finish_reason is None and s.stop_reason is None and not out.prompt_token_ids
    )  # fmt: skip


def _with_token_deltas(batch: CoreOutputs) -> CoreOutputs:
    """The batch as sent: token-only outputs as ``TokenDeltas`` columns."""
    deltas = TokenDeltas([], [], [])
    rest = []
    for out in batch.outputs:
        if _is_token_delta(out):
            deltas.request_ids.append(out.request_id)
            deltas.token_ids.append(out.outputs[0].token_ids)
            deltas.num_cached_tokens.append(out.num_cached_tokens)
        else:
            rest.append(out)
    if not deltas.request_ids:
        return batch
    return msgspec.structs.replace(batch, outputs=rest, token_deltas=deltas)


def _without_token_deltas(batch: CoreOutputs) -> CoreOutputs:
    """The batch as received, its ``TokenDeltas`` back in ``outputs`` as ``RequestOutput``s."""
    deltas = batch.token_deltas
    if deltas.request_ids:
        columns = zip(deltas.request_ids, deltas.token_ids, deltas.num_cached_tokens, strict=True)
        batch.outputs = [
            RequestOutput(request_id, None, [], [CompletionOutput(0, "", ids)],
                          num_cached_tokens=num_cached)
            for request_id, ids, num_cached in columns
        ] + batch.outputs  # fmt: skip
        batch.token_deltas = TokenDeltas()
    return batch


def command_decoder() -> msgspec.msgpack.Decoder:
    """A decoder of ``Command`` messages (one per receiving thread)."""
    return msgspec.msgpack.Decoder(Command)


class CoreMessageDecoder:
    """Decodes ``CoreMessage`` bytes, putting a batch's token deltas back into its outputs."""

    def __init__(self) -> None:
        self._decoder = msgspec.msgpack.Decoder(CoreMessage)

    def decode(self, data: bytes | memoryview) -> CoreMessage:
        message = self._decoder.decode(data)
        if isinstance(message, CoreOutputs):
            return _without_token_deltas(message)
        return message


def core_message_decoder() -> CoreMessageDecoder:
    """A decoder of ``CoreMessage`` messages (one per receiving thread)."""
    return CoreMessageDecoder()
