"""``min_tokens_per_step="auto"`` pauses whole batch-size buckets (spec/batch_throttle.py): the
mean of a bucket's first 16 drafted steps, then a long moving average, against the bucket's
break-even; a paused bucket decodes plainly for 256 engine steps, then is measured afresh."""

from __future__ import annotations

import pytest
from test_spec_throttle import plain_future
from test_speculative import ENGINE

from parallm import LLM, SamplingParams
from parallm.engine import engine as engine_module
from parallm.engine.engine import LLMEngine
from parallm.engine.spec import batch_throttle, drafting
from parallm.engine.spec.batch_throttle import (
    PAUSE_STEPS,
    WARMUP_STEPS,
    BatchThrottle,
    step_tokens,
)
from parallm.engine.spec.config import SpeculativeConfig
from parallm.engine.spec.drafting import Drafter
from parallm.engine.spec.step_costs import PLAIN_PROBE_STEPS


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


def _drafter(threshold) -> Drafter:
    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=4,
                             min_tokens_per_step=threshold)  # fmt: skip
    drafter = Drafter(spec)
    drafter.measure_step_costs(async_scheduling=True)
    return drafter


def test_only_auto_pauses_buckets_and_only_numbers_pause_requests():
    auto = _drafter("auto")
    assert auto.batch_throttle is not None and auto.threshold() is None
    number = _drafter(1.5)
    assert number.batch_throttle is None and number.threshold() == 1.5
    number.count_step()  # nothing to count
    number.record_step(8, [1, 1])
    assert _drafter(None).threshold() is None


def test_auto_drafts_for_every_request_unless_the_bucket_is_paused(monkeypatch):
    drafter = _drafter("auto")
    monkeypatch.setattr(drafter.costs, "wants_plain", lambda batch_size: False)
    monkeypatch.setattr(drafter.costs, "break_even", lambda batch_size: 2.0)

    class Seq:  # a request whose own tokens per step are far below the break-even
        def __init__(self) -> None:
            from parallm.engine.spec.throttle import DraftHistory

            self.draft_history = DraftHistory(mean_tokens_per_step=1.0)

    running = [Seq(), Seq()]
    assert drafter.drafts_for_all(running) and drafter.will_draft(running)
    for _ in range(WARMUP_STEPS):
        drafter.count_step()
        drafter.record_step(len(running), [1, 1])
    assert not drafter.may_draft(running) and not drafter.drafts_for_all(running, probe=True)
    assert not drafter.will_draft(running)
    assert drafter.may_draft(running * 2)  # batch 4: another bucket


# The engine, on the tiny model: three requests, the first one's drafts always right (K + 1
# tokens a drafted step), the others' always wrong (one token): 7/3 tokens a sequence.
K = 4


def _mixed_oracle(monkeypatch, future: dict[tuple[int, ...], list[int]], modes: list[str]):
    """Prompt lookup replaced, by prompt: plain decoding's next K tokens ("right"), K wrong
    ones ("wrong") or nothing ("none")."""
    mode_of = dict(zip(future, modes, strict=True))

    def propose(token_ids, k, lookup_min, lookup_max):
        for prompt, out in future.items():
            if tuple(token_ids[: len(prompt)]) == prompt:
                done = len(token_ids) - len(prompt)
                nxt = out[done : done + K]
                return {"right": nxt, "wrong": [(t + 1) % 50 for t in nxt], "none": []}[
                    mode_of[prompt]
                ]
        raise AssertionError("unknown prompt")

    monkeypatch.setattr(drafting, "propose_ngram", propose)


def _set_step_times(monkeypatch, drafted_seconds: float) -> None:
    """Plain steps take a second, drafted ones ``drafted_seconds``: the break-even, set rather
    than measured (a loaded CPU's times would decide the test)."""
    time_step = engine_module._time_step

    def timed(costs, batch, ran_ahead, seconds):
        drafted = any(item.draft_token_ids for item in batch.seqs)
        time_step(costs, batch, ran_ahead, drafted_seconds if drafted else 1.0)

    monkeypatch.setattr(engine_module, "_time_step", timed)


def _watch_steps(monkeypatch) -> list[str]:
    """Each launched step's drafting, over its decoding sequences with room left for K drafts
    (``max_tokens`` cuts the drafts of a sequence near its end): "D" every one drafts, "P"
    none does, "S" the batch is split."""
    states = []
    count_step = LLMEngine._count_step

    def count(self, batch):
        drafted = [bool(item.draft_token_ids) for item in batch.seqs
                   if item.samples and item.seq.num_output_tokens > 0
                   and item.seq.params.max_tokens - item.seq.num_output_tokens > K + 1]  # fmt: skip
        if drafted:
            states.append("D" if all(drafted) else "P" if not any(drafted) else "S")
        count_step(self, batch)

    monkeypatch.setattr(LLMEngine, "_count_step", count)
    return states


_FUTURES: dict[str, dict[tuple[int, ...], list[int]]] = {}  # by model: the same every run


def _mixed_run(path, ordinary_token_ids, monkeypatch, min_tokens_per_step, **engine_args):
    prompts = [ordinary_token_ids[:12], ordinary_token_ids[5:20], ordinary_token_ids[9:23]]
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    if path not in _FUTURES:
        _FUTURES[path] = plain_future(path, prompts, params)
    future = _FUTURES[path]
    _mixed_oracle(monkeypatch, future, ["right", "wrong", "wrong"])
    states = _watch_steps(monkeypatch)
    spec = {"method": "ngram", "num_speculative_tokens": K,
            "min_tokens_per_step": min_tokens_per_step}  # fmt: skip
    llm = LLM(path, speculative_config=spec, **engine_args, **ENGINE)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == list(future.values())
    return "".join(states), llm.engine


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_auto_drafts_the_whole_batch_where_drafted_steps_pay(
    async_scheduling, tiny_model_dir, ordinary_token_ids, monkeypatch
):
    """A drafted step timed as a plain one: the break-even is 1, which 7/3 tokens a sequence
    beat, so every request drafts in every step, the always-wrong ones too, but for each
    bucket's plain probe."""
    _set_step_times(monkeypatch, drafted_seconds=1.0)
    path = str(tiny_model_dir("llama3"))
    states, engine = _mixed_run(path, ordinary_token_ids, monkeypatch, "auto",
                                async_scheduling=async_scheduling)  # fmt: skip
    assert "S" not in states, states
    # Bucket 4, then 2 once the first request has finished: each probes its plain time.
    assert states.count("P") <= 2 * PLAIN_PROBE_STEPS + 2, states
    assert states.count("D") >= 150, states
    assert engine.stats["spec_bucket_pauses"] == 0


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_auto_pauses_the_whole_batch_where_drafted_steps_cost_more(
    async_scheduling, tiny_model_dir, ordinary_token_ids, monkeypatch
):
    """A drafted step timed at 100 plain ones: the bucket drafts WARMUP_STEPS steps, then the
    whole batch decodes plainly for the pause (shortened here), drafts and is measured again,
    and pauses again; never a step with some requests drafting and others not."""
    monkeypatch.setattr(batch_throttle, "PAUSE_STEPS", 24)
    _set_step_times(monkeypatch, drafted_seconds=100.0)
    path = str(tiny_model_dir("llama3"))
    states, engine = _mixed_run(path, ordinary_token_ids, monkeypatch, "auto",
                                async_scheduling=async_scheduling)  # fmt: skip
    assert "S" not in states, states
    drafted_runs = [len(run) for run in states.split("P") if run]
    plain_runs = [len(run) for run in states.split("D") if run]
    # Drafting, a pause, drafting again (afresh: a whole warm-up), a pause... in bucket 4,
    # then in bucket 2 once the first request has finished (the last run may be cut short).
    assert drafted_runs[:-1] == [WARMUP_STEPS] * (len(drafted_runs) - 1), states
    assert len(drafted_runs) >= 4 and drafted_runs[-1] <= WARMUP_STEPS, states
    assert plain_runs.count(24) >= 2, states
    assert engine.stats["spec_bucket_pauses"] >= 4


def test_a_numeric_threshold_still_pauses_requests_one_by_one(
    tiny_model_dir, ordinary_token_ids, monkeypatch
):
    """Unchanged: the always-wrong requests pause on their own and the right one drafts on,
    in the same steps (what the step watch calls a split)."""
    path = str(tiny_model_dir("llama3"))
    states, engine = _mixed_run(path, ordinary_token_ids, monkeypatch, 1.5)
    assert states.count("S") >= 20, states
    assert engine.drafter.batch_throttle is None and engine.stats["spec_bucket_pauses"] == 0


def test_sequences_without_a_proposal_count_one_token_in_their_bucket(
    tiny_model_dir, ordinary_token_ids, monkeypatch
):
    """Per drafted step the bucket sees one count a sampled sequence: K + 1 for the request
    whose drafts are right, one for a chain of fillers only (its lookup found nothing) and
    one for a request that is never drafted (a penalty)."""
    path = str(tiny_model_dir("llama3"))
    prompts = [ordinary_token_ids[:12], ordinary_token_ids[5:20], ordinary_token_ids[9:23]]
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    params = [greedy, greedy, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                             presence_penalty=0.5)]  # fmt: skip
    future = plain_future(path, prompts, greedy)
    _mixed_oracle(monkeypatch, future, ["right", "none", "right"])
    recorded = []
    record = BatchThrottle.record

    def spy(self, batch_size, tokens, break_even):
        recorded.append(sorted(tokens))
        record(self, batch_size, tokens, break_even)

    monkeypatch.setattr(BatchThrottle, "record", spy)
    spec = {"method": "ngram", "num_speculative_tokens": K, "min_tokens_per_step": "auto"}
    llm = LLM(path, speculative_config=spec, **ENGINE)
    llm.engine.drafter.full_chains = True  # a lookup that finds nothing verifies K fillers
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs[:2]] == list(future.values())[:2]
    assert len(recorded) >= 5, recorded
    assert recorded[:5] == [[1, 1, K + 1]] * 5, recorded
