"""Detokenization in the API process, for requests the core runs with ``detokenize=False``.

The engine core decodes text itself only where it must: stop strings are found in the text, and
the step that completes one ends the sequence (and frees its blocks). Every other request is
sent with ``detokenize=False``, so the core returns token ids only, and this module turns them
into the same text and decoded logprob tokens the core would have produced, off the core's
step loop. The rules it mirrors (``OutputProcessor``): each sample's new tokens go through an
``IncrementalDetokenizer``, except the token that ended the sample with finish_reason "stop"
(EOS or a stop token id: kept in ``token_ids``, left out of the text); a finished sample
flushes what the detokenizer held back; every logprob entry's ``decoded_token`` is its token
decoded alone.
"""

from __future__ import annotations

import copy
from typing import Any

from parallm.detokenizer import IncrementalDetokenizer
from parallm.outputs import CompletionOutput, Logprob, RequestOutput
from parallm.sampling_params import SamplingParams


def detokenizes_here(params: SamplingParams, tokenizer: Any | None) -> bool:
    """Whether the API process detokenizes a request with these parameters: it wants text,
    there is a tokenizer, and no stop string needs the text inside the core."""
    return tokenizer is not None and params.detokenize and not params.stop


def without_detokenization(params: SamplingParams) -> SamplingParams:
    """The parameters to send to the core for a request detokenized here."""
    sent = copy.copy(params)
    sent.detokenize = False
    return sent


class OutputDetokenizer:
    """Fills in the text and decoded tokens of the outputs of the requests registered here."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._requests: dict[str, _RequestText] = {}

    def register(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams):
        self._requests[request_id] = _RequestText(self.tokenizer, prompt_token_ids, params)

    def forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def __len__(self) -> int:
        return len(self._requests)

    def apply(self, out: RequestOutput) -> None:
        """Decode a delta of a registered request in place; forgets the request once it is
        finished (unregistered requests are left alone)."""
        request = self._requests.get(out.request_id)
        if request is None:
            return
        for sample in out.outputs:
            request.decode_sample(sample)
        if out.prompt_logprobs is not None:
            for entry in out.prompt_logprobs:
                if entry is not None:
                    request.decode_logprobs(entry)
        if out.finished:
            self.forget(out.request_id)


class _RequestText:
    """One request's detokenizers, one per sample (created as samples first report)."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.samples: dict[int, IncrementalDetokenizer] = {}

    def decode_sample(self, sample: CompletionOutput) -> None:
        detok = self.samples.get(sample.index)
        if detok is None:
            detok = IncrementalDetokenizer(self.tokenizer, self.prompt_token_ids, self.params)
            self.samples[sample.index] = detok
        ids = sample.token_ids
        if sample.finish_reason == "stop" and not isinstance(sample.stop_reason, str) and ids:
            ids = ids[:-1]  # the EOS or stop token that ended it
        detok.add_tokens(ids)
        if sample.finish_reason is not None:
            detok.finish()
            del self.samples[sample.index]
        sample.text = detok.take_delta()
        for entry in sample.logprobs or ():
            self.decode_logprobs(entry)

    def decode_logprobs(self, entry: dict[int, Logprob]) -> None:
        for token_id, logprob in entry.items():
            logprob.decoded_token = self.tokenizer.decode([token_id])
