"""The min_tokens rule: the sampler's ban, the greedy fast path's test and the stop check agree.

A stop token (EOS, a stop id) may end a sequence only once ``min_tokens`` tokens precede it.
Each part that applies the rule is asked about every output position around ``min_tokens``.
"""

from __future__ import annotations

import pytest
import torch

from parallm import LLM
from parallm.engine.request import Sequence
from parallm.engine.sampler import Sampler, SamplerOutput, SamplingTensors
from parallm.sampling_params import SamplingParams

MIN_TOKENS = 3


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama3")), dtype="float32", device="cpu", max_model_len=64,
              kv_cache_memory=1 << 20)  # fmt: skip
    return llm.engine


def _seq(num_outputs: int, filler: int, **params: object) -> Sequence:
    sp = SamplingParams(max_tokens=20, min_tokens=MIN_TOKENS, **params)
    seq = Sequence("r", 0, [filler, filler], sp, arrival_time=0.0)
    for _ in range(num_outputs):
        seq.append_token(filler)
    return seq


def _sampler_keeps_out(engine, seq: Sequence, token: int) -> bool:
    """Whether sampling avoids ``token`` when it is by far the likeliest one."""
    vocab = engine.runner.model_cfg.vocab_size
    logits = torch.zeros(1, vocab)
    logits[0, token] = 50.0
    row = engine.runner._sampling_row(seq)
    sampled = Sampler()(logits, SamplingTensors.build([row], vocab, torch.device("cpu")))
    return int(sampled.token_ids[0]) != token


def _stop_check_ends(engine, seq: Sequence, token: int) -> bool:
    """Whether the output processor ends the sequence on ``token`` as its next token."""
    finished = engine.outputs.process([seq], SamplerOutput(token_ids=torch.tensor([token])))
    return finished == [seq] and seq.finish_reason == "stop"


@pytest.mark.parametrize("ignore_eos", [False, True])
@pytest.mark.parametrize("with_stop_id", [False, True])
def test_sampler_fast_path_and_stop_check_agree(engine, ordinary_token_ids, ignore_eos,
                                                with_stop_id):  # fmt: skip
    eos = engine.runner.eos_token_ids[0]
    filler, stop_id = [t for t in ordinary_token_ids[:3] if t != eos][:2]
    params = {"ignore_eos": ignore_eos, "stop_token_ids": [stop_id] if with_stop_id else []}
    for num_outputs in range(MIN_TOKENS + 2):
        allowed = num_outputs >= MIN_TOKENS
        for token in (eos, stop_id):
            stops_at_all = (token == eos and not ignore_eos) or (token == stop_id and with_stop_id)
            seq = _seq(num_outputs, filler, **params)
            assert seq.stop_tokens_allowed() == allowed
            banned = _sampler_keeps_out(engine, seq, token)
            assert banned == (stops_at_all and not allowed), (num_outputs, token)
            # The greedy fast path (and async run-ahead) skip the sampler exactly when it bans
            # nothing.
            can_ban = with_stop_id or not ignore_eos
            assert seq.bans_stop_tokens == (can_ban and not allowed)
            ends = _stop_check_ends(engine, seq, token)
            assert ends == (stops_at_all and allowed), (num_outputs, token)
