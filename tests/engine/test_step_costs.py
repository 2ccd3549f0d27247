"""``min_tokens_per_step="auto"``: the engine times its plain and drafted decode steps per
batch-size bucket (spec/step_costs.py) and pauses the requests whose tokens per drafted step
fall below the measured break-even; the output stays plain decoding's."""

from __future__ import annotations

import pytest
from test_spec_throttle import _oracle_ngram, _run, plain_future

from parallm import SamplingParams
from parallm.engine import engine as engine_module
from parallm.engine.spec.step_costs import PLAIN_PROBE_STEPS, REPROBE_AFTER, StepCosts, bucket

K = 4


def test_buckets_are_powers_of_two():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 256)] == [1, 2, 4, 4, 8, 8, 16, 256]


def _probe(costs: StepCosts, batch: int, seconds: float) -> None:
    """The probe's plain steps: the first can not have run ahead, the others did."""
    for i in range(PLAIN_PROBE_STEPS):
        assert costs.wants_plain(batch)
        costs.record(batch, drafted=False, ran_ahead=i > 0, seconds=seconds)


def test_a_new_bucket_probes_plain_steps_then_drafts_at_the_measured_break_even():
    costs = StepCosts(async_scheduling=True)
    _probe(costs, 3, seconds=2.0)
    assert not costs.wants_plain(3) and not costs.wants_plain(4)  # one bucket
    assert costs.plain == {4: 2.0} and costs.break_even(3) is None
    costs.record(3, drafted=True, ran_ahead=False, seconds=9.0)  # follows a plain step: not timed
    assert costs.break_even(3) is None
    costs.record(3, drafted=True, ran_ahead=False, seconds=5.0)
    assert costs.break_even(3) == pytest.approx(2.5)
    costs.record(4, drafted=True, ran_ahead=False, seconds=10.0)  # moving average
    assert costs.break_even(4) == pytest.approx((5.0 + 0.2 * 5.0) / 2.0)
    assert costs.wants_plain(8) and costs.break_even(8) is None  # another bucket: its own probe


def test_plain_steps_that_did_not_run_ahead_are_not_plain_decodings_cost():
    costs = StepCosts(async_scheduling=True)
    _probe(costs, 1, seconds=1.0)
    for _ in range(3):  # every request paused: plain steps, but synchronous ones
        costs.record(1, drafted=False, ran_ahead=False, seconds=4.0)
    assert costs.plain == {1: 1.0}
    sync = StepCosts(async_scheduling=False)  # nothing runs ahead: plain after plain counts
    for _ in range(PLAIN_PROBE_STEPS):
        assert sync.wants_plain(1)
        sync.record(1, drafted=False, ran_ahead=False, seconds=3.0)
    assert sync.plain == {1: 3.0} and not sync.wants_plain(1)


def test_a_step_with_prompt_tokens_breaks_a_run_and_plain_times_are_measured_again():
    costs = StepCosts(async_scheduling=True)
    _probe(costs, 2, seconds=1.0)
    costs.record(2, drafted=True, ran_ahead=False, seconds=3.0)
    costs.interrupt(2)
    costs.record(2, drafted=True, ran_ahead=False, seconds=30.0)  # after a prefill: not timed
    assert costs.drafted == {}
    for _ in range(REPROBE_AFTER - 2):
        assert not costs.wants_plain(2)
        costs.record(2, drafted=True, ran_ahead=False, seconds=3.0)
    assert costs.drafted == {2: pytest.approx(3.0)}
    _probe(costs, 2, seconds=2.0)  # stale after REPROBE_AFTER drafted steps
    assert costs.plain == {2: pytest.approx(2.0 - 0.8**3)}  # three timed steps of 2.0
    assert not costs.wants_plain(2)


def test_auto_is_accepted_and_other_strings_are_not():
    from parallm.engine.spec.config import SpeculativeConfig

    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=K, min_tokens_per_step="auto")
    assert spec.min_tokens_per_step == "auto"
    with pytest.raises(ValueError, match=r'num_speculative_tokens \+ 1 = 5\] or "auto", got'):
        SpeculativeConfig(method="ngram", num_speculative_tokens=K, min_tokens_per_step="fast")


@pytest.mark.parametrize("slow_verify", [False, True])
def test_auto_pauses_drafting_where_a_drafted_step_costs_more_than_it_emits(
    slow_verify, tiny_model_dir, ordinary_token_ids, monkeypatch
):
    """Drafts that are always right emit K + 1 tokens a step. A drafted step timed at 100
    plain steps costs more than that, so requests pause and draft only in probes; timed as a
    plain step it pays, so they keep drafting as often as without the threshold. Either way
    the output is plain decoding's. The steps' times are set, not measured: on a loaded CPU a
    measured drafted step may cost more than K + 1 plain ones."""
    path = str(tiny_model_dir("llama3"))
    prompts = [ordinary_token_ids[:12], ordinary_token_ids[5:20]]
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    future = plain_future(path, prompts, params)
    _oracle_ngram(monkeypatch, future, right=True)
    spec = {"method": "ngram", "num_speculative_tokens": K}
    _, always = _run(path, prompts, params, spec)
    time_step = engine_module._time_step

    def timed(costs, batch, ran_ahead, seconds):
        drafted = any(item.draft_token_ids for item in batch.seqs)
        time_step(costs, batch, ran_ahead, 100.0 if drafted and slow_verify else 1.0)

    monkeypatch.setattr(engine_module, "_time_step", timed)
    outs, auto = _run(path, prompts, params, {**spec, "min_tokens_per_step": "auto"})
    assert outs == list(future.values())
    assert always >= 2 * 200 // (K + 1) - 2
    if slow_verify:  # drafted steps to measure, then one probe in PROBE_EVERY + 1 steps
        assert auto <= always / 2
    else:  # every step but the plain probe's drafts
        assert auto >= always - 2 * PLAIN_PROBE_STEPS


def test_a_probe_that_only_meets_prompt_tokens_ends_without_a_plain_time():
    costs = StepCosts(async_scheduling=True)
    for _ in range(PLAIN_PROBE_STEPS):
        assert costs.wants_plain(16)
        costs.interrupt(16)  # every step also computes some prompt's tokens
    assert not costs.wants_plain(16) and costs.break_even(16) is None  # so every request drafts
