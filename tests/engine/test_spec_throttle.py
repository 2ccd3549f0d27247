"""A request whose drafts keep being rejected stops drafting and tries again every few steps
(``min_tokens_per_step``); one whose drafts are accepted keeps drafting; the output stays plain
decoding's either way."""

from __future__ import annotations

import pytest
from test_speculative import ENGINE

from parallm import LLM, SamplingParams
from parallm.engine.engine import LLMEngine
from parallm.engine.spec import drafting
from parallm.engine.spec.throttle import PROBE_EVERY, DraftHistory, is_probe_step

K = 4


def test_history_pauses_below_the_threshold_and_probes_on_the_beat():
    history = DraftHistory()
    assert history.should_draft(2.0, probe=False)  # nothing known yet: draft
    history.record(accepted=0)  # one token from a drafted step
    assert history.mean_tokens_per_step == 1.0
    beat = [is_probe_step(step) for step in range(1, 2 * (PROBE_EVERY + 1) + 1)]
    assert beat == ([False] * PROBE_EVERY + [True]) * 2
    assert [history.should_draft(2.0, probe) for probe in beat] == beat
    history.record(accepted=4)  # the probe paid off: 5 tokens
    assert history.mean_tokens_per_step == pytest.approx(1.0 + 0.3 * 4)
    assert history.should_draft(2.0, probe=False)
    assert DraftHistory(mean_tokens_per_step=1.0).should_draft(None, probe=False)  # always


def test_history_remembers_whether_the_last_step_accepted_every_draft():
    history = DraftHistory()
    assert not history.accepted_all  # no verified step yet: no step launches ahead
    history.record(accepted=4, proposed=4)
    assert history.accepted_all
    history.record(accepted=3, proposed=4)
    assert not history.accepted_all
    history.record(accepted=2, proposed=2)
    assert history.accepted_all


def _oracle_ngram(monkeypatch, future: dict[tuple[int, ...], list[int]], right: bool) -> None:
    """Prompt lookup replaced by plain decoding's next K tokens (``right``) or K wrong ones."""

    def propose(token_ids, k, lookup_min, lookup_max):
        for prompt, out in future.items():
            if tuple(token_ids[: len(prompt)]) == prompt:
                nxt = out[len(token_ids) - len(prompt) : len(token_ids) - len(prompt) + K]
                return nxt if right else [(t + 1) % 50 for t in nxt]
        raise AssertionError("unknown prompt")

    monkeypatch.setattr(drafting, "propose_ngram", propose)


def plain_future(path, prompts, params) -> dict[tuple[int, ...], list[int]]:
    """Plain decoding's output of each prompt, by prompt."""
    plain = LLM(path, **ENGINE).generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False
    )
    return {tuple(p): list(o.outputs[0].token_ids) for p, o in zip(prompts, plain, strict=True)}


def _run(path, prompts, params, spec):
    llm = LLM(path, speculative_config=spec, **ENGINE)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], llm.engine.spec_stats.num_proposals


@pytest.mark.parametrize("right", [False, True])
def test_rejected_requests_pause_and_accepted_ones_keep_drafting(
    right, tiny_model_dir, ordinary_token_ids, monkeypatch
):
    path = str(tiny_model_dir("llama3"))
    prompts = [ordinary_token_ids[:12], ordinary_token_ids[5:20]]
    params = SamplingParams(temperature=0, max_tokens=45, ignore_eos=True)
    future = plain_future(path, prompts, params)
    _oracle_ngram(monkeypatch, future, right)
    spec = {"method": "ngram", "num_speculative_tokens": K}
    always, always_proposals = _run(path, prompts, params, spec)
    paused, paused_proposals = _run(path, prompts, params, {**spec, "min_tokens_per_step": 1.5})
    assert always == paused == list(future.values())
    if right:  # every step emits K + 1 tokens: never paused
        assert paused_proposals == always_proposals
    else:  # every drafted step emits one token: one probe in PROBE_EVERY + 1 steps
        assert always_proposals >= 2 * 40
        assert paused_proposals <= 2 * (1 + 45 // (PROBE_EVERY + 1) + 1)


def test_paused_requests_probe_in_the_same_steps(tiny_model_dir, ordinary_token_ids, monkeypatch):
    """A step with any drafts is a drafted step for the whole batch: the two paused requests
    draft together, so drafted steps are half their proposals, not as many."""
    path = str(tiny_model_dir("llama3"))
    prompts = [ordinary_token_ids[:12], ordinary_token_ids[5:20]]
    params = SamplingParams(temperature=0, max_tokens=45, ignore_eos=True)
    future = plain_future(path, prompts, params)
    first = tuple(prompts[0])

    def propose(token_ids, k, lookup_min, lookup_max):
        # The first request's drafts are right for its first 12 tokens, so it pauses later
        # than the second, whose drafts are never right.
        for prompt, out in future.items():
            if tuple(token_ids[: len(prompt)]) == prompt:
                done = len(token_ids) - len(prompt)
                nxt = out[done : done + K]
                return nxt if prompt == first and done < 12 else [(t + 1) % 50 for t in nxt]
        raise AssertionError("unknown prompt")

    monkeypatch.setattr(drafting, "propose_ngram", propose)
    drafted_steps = []
    count_step = LLMEngine._count_step

    def count(self, batch):
        drafted_steps.append(sum(1 for item in batch.seqs if item.draft_token_ids))
        count_step(self, batch)

    monkeypatch.setattr(LLMEngine, "_count_step", count)
    spec = {"method": "ngram", "num_speculative_tokens": K, "min_tokens_per_step": 1.5}
    outs, proposals = _run(path, prompts, params, spec)
    assert outs == list(future.values())
    drafted = [n for n in drafted_steps if n]
    assert sum(drafted) == proposals
    # Once both have paused, they probe in the same steps (until the first one finishes).
    paused_since = max(i for i, n in enumerate(drafted_steps) if n == 1 and i < 12) + 1
    late = [n for n in drafted_steps[paused_since:] if n]
    assert late[:2] == [2, 2], str(drafted_steps)


@pytest.mark.parametrize("value", [1.0, 0.5, 6.0, "2", True])
def test_bad_threshold_is_named(value, tiny_model_dir):
    spec = {"method": "ngram", "num_speculative_tokens": K, "min_tokens_per_step": value}
    with pytest.raises(ValueError, match=r"min_tokens_per_step must be a number in \(1, "):
        LLM(str(tiny_model_dir("llama3")), speculative_config=spec, **ENGINE)


def test_with_async_scheduling_paused_requests_run_ahead_between_probes(
    tiny_model_dir, ordinary_token_ids, monkeypatch
):
    """Once every request has paused, the steps between probes carry no drafts, so they run
    ahead as plain decoding does; the probes come on the same beat, and the output is plain
    decoding's."""
    path = str(tiny_model_dir("llama3"))
    prompts = [ordinary_token_ids[:12], ordinary_token_ids[5:20]]
    params = SamplingParams(temperature=0, max_tokens=45, ignore_eos=True)
    future = plain_future(path, prompts, params)
    _oracle_ngram(monkeypatch, future, right=False)
    spec = {"method": "ngram", "num_speculative_tokens": K, "min_tokens_per_step": 1.5}
    _, sync_proposals = _run(path, prompts, params, spec)
    llm = LLM(path, speculative_config=spec, async_scheduling=True, **ENGINE)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == list(future.values())
    stats = llm.engine.stats
    assert stats["num_overlapped_steps"] >= 30  # of about 45 steps
    # The probe beat counts the steps that ran ahead: about as many probes as without them.
    assert abs(llm.engine.spec_stats.num_proposals - sync_proposals) <= len(prompts)
    assert llm.engine._inflight is None
