"""``min_tokens_per_step="auto"`` pauses whole batch-size buckets (spec/batch_throttle.py): the
mean of a bucket's first 16 drafted steps, then a long moving average, against the bucket's
break-even; a paused bucket decodes plainly for 256 engine steps, then is measured afresh."""

from __future__ import annotations

import pytest

from parallm.engine.spec.batch_throttle import (
    PAUSE_STEPS,
    WARMUP_STEPS,
    BatchThrottle,
    step_tokens,
)


def _steps(throttle: BatchThrottle, n: int, tokens: list[int], break_even=2.0, batch=8) -> None:
    for _ in range(n):
        throttle.tick()
        throttle.record(batch, tokens, break_even)


def test_a_bucket_pauses_only_after_its_warm_up_of_drafted_steps():
    assert (WARMUP_STEPS, PAUSE_STEPS) == (16, 256)
    throttle = BatchThrottle()
    _steps(throttle, WARMUP_STEPS - 1, [1, 1])  # far below the break-even, but too few steps
    assert not throttle.paused(8) and throttle.num_pauses == 0
    assert throttle.measures[8].mean == 1.0
    _steps(throttle, 1, [1, 1])
    assert throttle.paused(8) and throttle.paused(5) and throttle.num_pauses == 1  # one bucket
    assert not throttle.paused(4) and not throttle.paused(16)  # the other buckets draft


def test_the_warm_up_is_a_plain_mean_and_then_a_long_moving_average():
    throttle = BatchThrottle()
    _steps(throttle, WARMUP_STEPS // 2, [5, 5], break_even=None)
    _steps(throttle, WARMUP_STEPS // 2, [1, 3], break_even=None)
    assert throttle.measures[8].mean == pytest.approx(3.5)
    _steps(throttle, 1, [1, 1], break_even=None)
    assert throttle.measures[8].mean == pytest.approx(3.5 + (1 - 3.5) / 20)  # weight 1/20


def test_a_few_steps_without_matches_do_not_pause_a_bucket_that_drafts_well():
    """Prompt lookup's bursts: five steps of one token after a warm-up at three a step."""
    throttle = BatchThrottle()
    _steps(throttle, WARMUP_STEPS, [3, 3])
    _steps(throttle, 5, [1, 1])
    assert not throttle.paused(8)
    _steps(throttle, 20, [1, 1])  # a lasting drop does
    assert throttle.paused(8)


def test_a_bucket_without_a_break_even_never_pauses_until_one_is_measured():
    throttle = BatchThrottle()
    _steps(throttle, 3 * WARMUP_STEPS, [1], break_even=None)
    assert not throttle.paused(8)
    _steps(throttle, 1, [1], break_even=1.5)
    assert throttle.paused(8)


def test_a_measure_at_the_break_even_keeps_drafting():
    throttle = BatchThrottle()
    _steps(throttle, 2 * WARMUP_STEPS, [2, 2], break_even=2.0)
    assert not throttle.paused(8)


def test_a_paused_bucket_drafts_again_after_its_pause_and_measures_afresh():
    throttle = BatchThrottle()
    _steps(throttle, WARMUP_STEPS, [1, 1])
    assert throttle.paused(8) and throttle.num_paused == 1
    for _ in range(PAUSE_STEPS - 1):
        throttle.tick()
        # A step launched before the pause, recorded during it: not counted.
        throttle.record(8, [5, 5], 2.0)
        assert throttle.paused(8)
    assert 8 not in throttle.measures
    throttle.tick()
    assert not throttle.paused(8) and throttle.num_paused == 0
    _steps(throttle, WARMUP_STEPS - 1, [1, 1])  # a fresh warm-up, not the old average
    assert not throttle.paused(8) and throttle.measures[8].steps == WARMUP_STEPS - 1
    _steps(throttle, 1, [1, 1])
    assert throttle.paused(8) and throttle.num_pauses == 2


def test_the_pause_clock_is_engine_steps_at_any_batch_size():
    throttle = BatchThrottle()
    _steps(throttle, WARMUP_STEPS, [1, 1])
    _steps(throttle, PAUSE_STEPS - 1, [5], batch=1)  # another bucket's steps count too
    assert throttle.paused(8)
    throttle.tick()
    assert not throttle.paused(8) and not throttle.paused(1)


def test_a_step_without_a_proposal_counts_one_token():
    assert step_tokens(proposed=4, accepted=2) == 3
    assert step_tokens(proposed=4, accepted=0) == 1
    assert step_tokens(proposed=0, accepted=0) == 1  # no drafts
    assert step_tokens(proposed=0, accepted=3) == 1  # fillers only, three of them matched
