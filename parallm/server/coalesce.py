"""Merging a request's output deltas that its consumer has not taken yet.

A stream whose client (or event loop) lags behind the engine would otherwise get one SSE chunk
per engine step, each costing a JSON encoding and a socket write; merged, it gets one chunk
with everything that is new, as vLLM's ``RequestOutputCollector`` does. Nothing is lost or
reordered: texts and token ids are concatenated, logprobs extended, and the latest finish,
counters and metrics kept.
"""

from __future__ import annotations

from parallm.outputs import CompletionOutput, RequestOutput


def merge_delta(pending: RequestOutput, new: RequestOutput) -> RequestOutput:
    """``pending`` extended by the later delta ``new`` of the same request (in place)."""
    samples = {s.index: s for s in pending.outputs}
    for sample in new.outputs:
        earlier = samples.get(sample.index)
        if earlier is None:
            pending.outputs.append(sample)
            samples[sample.index] = sample
        elif earlier.finish_reason is None:  # a finished sample is only repeated later
            _extend(earlier, sample)
    pending.finished = new.finished
    pending.num_cached_tokens = new.num_cached_tokens
    if pending.prompt_logprobs is None:
        pending.prompt_logprobs = new.prompt_logprobs
    pending.metrics = new.metrics or pending.metrics
    pending.error = new.error or pending.error
    return pending


def _extend(earlier: CompletionOutput, later: CompletionOutput) -> None:
    earlier.text += later.text
    # New lists: the ones merged may still be referenced by whoever built the outputs.
    earlier.token_ids = earlier.token_ids + later.token_ids
    if earlier.logprobs is not None or later.logprobs is not None:
        earlier.logprobs = (earlier.logprobs or []) + (later.logprobs or [])
    earlier.cumulative_logprob = later.cumulative_logprob
    earlier.finish_reason = later.finish_reason
    earlier.stop_reason = later.stop_reason
