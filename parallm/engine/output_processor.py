"""After each step: append sampled tokens, record logprobs, detect stops, build outputs."""

from __future__ import annotations

import time
from typing import Any

from parallm.detokenizer import IncrementalDetokenizer, decode_in_context
from parallm.engine.prompt_logprobs import PromptScores
from parallm.engine.request import Request, Sequence
from parallm.engine.sampler import SamplerOutput
from parallm.outputs import (
    CompletionOutput,
    Logprob,
    PromptLogprobs,
    RequestMetrics,
    RequestOutput,
)
from parallm.sampling_params import SamplingParams


class OutputProcessor:
    """Turns sampler results into sequence state and ``RequestOutput`` objects."""

    def __init__(self, tokenizer: Any | None, eos_token_ids: tuple[int, ...], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.streaming: dict[str, bool] = {}
        self.detokenizers: dict[int, IncrementalDetokenizer] = {}
        self.num_sent: dict[int, int] = {}
        # request_id -> message, for requests whose output processing raised.
        self.errors: dict[str, str] = {}
        # Streaming requests whose prompt logprobs went out (with their first delta).
        self.prompt_logprobs_sent: set[str] = set()

    def register(self, request: Request, stream: bool) -> None:
        self.streaming[request.request_id] = stream
        # Detokenize as we go only when someone needs text before the end.
        if not self._detokenizes(request.params) or not (stream or request.params.stop):
            return
        for seq in request.seqs:
            self.detokenizers[seq.seq_id] = IncrementalDetokenizer(
                self.tokenizer, seq.prompt_token_ids, request.params
            )

    def forget(self, request: Request) -> None:
        """Drop everything kept for a request that finished or was aborted."""
        request_id = request.request_id
        # A sample's end normally drops these, but an aborted sample never reports its end.
        for seq in request.seqs:
            self.detokenizers.pop(seq.seq_id, None)
            self.num_sent.pop(seq.seq_id, None)
        self.streaming.pop(request_id, None)
        self.errors.pop(request_id, None)
        self.prompt_logprobs_sent.discard(request_id)

    def record_prompt_logprobs(self, scored: list[PromptScores]) -> list[Sequence]:
        """Append the scored prompt tokens to their sequences' ``prompt_logprobs``; returns
        the sequences whose recording failed (their requests are in ``errors``)."""
        failed = []
        for scores in scored:
            seq = scores.seq
            try:
                self._record_prompt_scores(seq, scores)
            except Exception as exc:  # one request's failure must not take the batch down
                self.errors[seq.request_id] = f"{type(exc).__name__}: {exc}"
                _finish(seq, "error", None)
                failed.append(seq)
        return failed

    def _record_prompt_scores(self, seq: Sequence, scores: PromptScores) -> None:
        entries = seq.prompt_logprobs
        prompt = seq.prompt_token_ids
        for j, logprob in enumerate(scores.logprobs):
            position = scores.first + j
            if position < len(entries):
                continue  # scored before a preemption
            if position != len(entries):
                raise RuntimeError(f"prompt token {position} scored before {len(entries)}")
            top = (scores.top_ids[j], scores.top_logprobs[j])
            entry = self._logprob_entry(seq.params, prompt[position], logprob, scores.ranks[j], top)
            entries.append(entry)

    def process(self, sampled: list[Sequence], result: SamplerOutput | None) -> list[Sequence]:
        """Append one token to each sampling sequence; return those that finished."""
        if result is None or not sampled:
            return []
        columns = (result.logprobs, result.ranks, result.top_token_ids, result.top_logprobs)
        return self.append_tokens(sampled, result.token_ids.tolist(),
                                  *(None if t is None else t.tolist() for t in columns))  # fmt: skip

    def append_tokens(
        self,
        sampled: list[Sequence],
        token_ids: list[int],
        logprobs: list[float] | None = None,
        ranks: list[int] | None = None,
        top_ids: list[list[int]] | None = None,
        top_lps: list[list[float]] | None = None,
    ) -> list[Sequence]:
        """``process`` for tokens already on the host (a verify step's accepted drafts): one
        token for each sequence, with its logprob and rank and top lists when asked for."""
        finished = []
        now = time.monotonic()  # every token of a step counts as produced at the same time
        for i, seq in enumerate(sampled):
            top = (top_ids[i], top_lps[i]) if top_ids is not None else ([], [])
            lp = (logprobs[i], ranks[i]) if logprobs is not None else None
            try:
                done = self._append(seq, token_ids[i], lp, top, now)
            except Exception as exc:  # one request's failure must not take the batch down
                self.errors[seq.request_id] = f"{type(exc).__name__}: {exc}"
                done = _finish(seq, "error", None)
            if done:
                seq.finish_time = now
                finished.append(seq)
        return finished

    def _append(
        self,
        seq: Sequence,
        token: int,
        logprob: tuple[float, int] | None,
        top: tuple[list[int], list[float]],
        now: float,
    ) -> bool:
        seq.append_token(token, now)
        if logprob is not None:
            seq.cumulative_logprob += logprob[0]
            if seq.logprobs is not None:
                k = seq.params.logprobs or 0
                top_k = (top[0][:k], top[1][:k])
                entry = self._logprob_entry(seq.params, token, logprob[0], logprob[1], top_k)
                seq.logprobs.append(entry)
        return self._check_stop(seq, token)

    def _logprob_entry(
        self,
        params: SamplingParams,
        token: int,
        logprob: float,
        rank: int,
        top: tuple[list[int], list[float]],
    ) -> dict[int, Logprob]:
        decode = self._detokenizes(params)
        entry = {
            tid: Logprob(lp, r + 1, self._decode_one(tid) if decode else None)
            for r, (tid, lp) in enumerate(zip(*top, strict=True))
        }
        entry[token] = Logprob(logprob, rank, self._decode_one(token) if decode else None)
        return entry

    def _detokenizes(self, params: SamplingParams) -> bool:
        """Whether outputs of a request carry text: a tokenizer and ``detokenize=True``."""
        return self.tokenizer is not None and params.detokenize

    def _decode_one(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _check_stop(self, seq: Sequence, token: int) -> bool:
        p = seq.params
        # The rule that sampling bans stop ids by, applied to the token just appended.
        may_stop = seq.stop_tokens_allowed(seq.num_output_tokens - 1)
        # The token that ends a sequence (EOS, a stop id) is kept in token_ids, not in the text.
        if may_stop and not p.ignore_eos and token in self.eos_token_ids:
            return _finish(seq, "stop", None)
        if may_stop and token in p.stop_token_ids:
            return _finish(seq, "stop", token)
        detok = self.detokenizers.get(seq.seq_id)
        stop_str = detok.add_tokens([token]) if detok is not None else None
        if stop_str is not None:
            return _finish(seq, "stop", stop_str)
        if p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
            return _finish(seq, "length", None)
        if seq.num_tokens >= self.max_model_len:
            return _finish(seq, "length", None)
        return False

    def last_output(self, request: Request, ended: list[Sequence]) -> RequestOutput:
        """The output of a request ended outside a step (an abort): ``ended`` report their end."""
        stream = self.streaming.get(request.request_id, False)
        return self._build(request, stream, {seq.seq_id for seq in ended})

    def collect(self, requests: dict[str, Request], sampled: list[Sequence]) -> list[RequestOutput]:
        """Outputs for requests that finished this step, and for streaming ones that progressed."""
        # An unfinished sample means an unfinished request: nothing to report offline.
        report = {
            seq.request_id: stream
            for seq in sampled
            if (stream := self.streaming.get(seq.request_id, False)) or seq.is_finished
        }
        if not report:
            return []
        progressed: dict[str, set[int]] = {}
        for seq in sampled:  # grouped once: a set per request would make this quadratic
            progressed.setdefault(seq.request_id, set()).add(seq.seq_id)
        outputs = []
        for request_id, stream in report.items():
            request = requests.get(request_id)
            if request is not None and (stream or request.is_finished):
                outputs.append(self._build(request, stream, progressed[request_id]))
        return outputs

    def _build(self, request: Request, delta: bool, progressed: set[int]) -> RequestOutput:
        # A delta carries only the samples that moved this step, so a finished sample of an
        # n > 1 request is reported once, not again with every step of its siblings.
        seqs = [s for s in request.seqs if s.seq_id in progressed] if delta else request.seqs
        completions = [self._completion(seq, delta) for seq in seqs]
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=completions,
            finished=request.is_finished,
            num_cached_tokens=max(s.num_cached_tokens for s in request.seqs),
            prompt_logprobs=self._prompt_logprobs(request, delta),
            metrics=_request_metrics(request),
            error=self.errors.get(request.request_id),
        )

    def _prompt_logprobs(self, request: Request, delta: bool) -> PromptLogprobs | None:
        """The first sample's prompt logprobs; a stream gets them once, with its first delta."""
        entries = request.seqs[0].prompt_logprobs
        if entries is None or (delta and request.request_id in self.prompt_logprobs_sent):
            return None
        if delta:
            self.prompt_logprobs_sent.add(request.request_id)
        return list(entries)

    def _completion(self, seq: Sequence, delta: bool) -> CompletionOutput:
        start = self.num_sent.get(seq.seq_id, 0) if delta else 0
        token_ids = seq.output_token_ids[start:]
        logprobs = seq.logprobs[start:] if seq.logprobs is not None else None
        if delta:
            self.num_sent[seq.seq_id] = seq.num_output_tokens
        text = self._text(seq, delta)
        if seq.is_finished or seq.finish_reason is not None:
            self.detokenizers.pop(seq.seq_id, None)
            if delta:
                self.num_sent.pop(seq.seq_id, None)
        return CompletionOutput(
            index=seq.index,
            text=text,
            token_ids=token_ids,
            cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
            logprobs=logprobs,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        )

    def _text(self, seq: Sequence, delta: bool) -> str:
        detok = self.detokenizers.get(seq.seq_id)
        if detok is not None:
            if seq.finish_reason is not None:
                detok.finish()
            return detok.take_delta() if delta else detok.text
        if not self._detokenizes(seq.params) or (delta and seq.finish_reason is None):
            return ""
        ids = seq.output_token_ids
        if seq.finish_reason == "stop" and not isinstance(seq.stop_reason, str):
            ids = ids[:-1]  # the EOS or stop token
        return decode_in_context(
            self.tokenizer, seq.prompt_token_ids, ids, seq.params.skip_special_tokens
        )


def _request_metrics(request: Request) -> RequestMetrics:
    def times(stage: str) -> list[float]:
        return [t for s in request.seqs if (t := getattr(s, stage)) is not None]

    finished = times("finish_time")
    return RequestMetrics(
        arrival_time=request.arrival_time,
        first_scheduled_time=min(times("first_scheduled_time"), default=None),
        first_token_time=min(times("first_token_time"), default=None),
        last_token_time=max(times("last_token_time"), default=None),
        finished_time=max(finished) if len(finished) == len(request.seqs) else None,
    )


def _finish(seq: Sequence, reason: str, stop_reason: int | str | None) -> bool:
    seq.finish_reason = reason
    seq.stop_reason = stop_reason
    return True
