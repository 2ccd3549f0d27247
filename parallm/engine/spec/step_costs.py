"""What a drafted step costs against a plain one, measured by the engine as it runs
(``speculative_config.min_tokens_per_step = "auto"``).

A drafted step pays while its sequences emit more tokens a step than it costs in plain steps:
its break-even tokens per step is the seconds of a drafted step over the seconds of a plain step
at the same batch size. That ratio depends on the model, the device, the drafter and the batch:
near 1 where weight reads dominate a step (a large model at a small batch), several times that
where kernel launches and host work do (a small model), or compute (a large batch). So the
engine measures it rather than assume it.

Every step that computes one known token per sequence is timed (the host's wall clock over
``LLMEngine.step``), and each kind keeps an exponential moving average per batch-size bucket
(the next power of two):
- plain steps only when they ran ahead (with async scheduling: launched while the step before
  was still on the device), which is what plain decoding costs; without async scheduling, when
  the step before was plain too, in the same bucket;
- drafted steps only when the step before was drafted too, in the same bucket.
A bucket asks for ``PLAIN_PROBE_STEPS`` plain steps to measure its plain time the first time
it is seen, and again after ``REPROBE_AFTER`` drafted steps, so the figure follows the load.
Until both times are known a bucket has no break-even, and every request drafts.
"""

from __future__ import annotations

# Weight of the newest step in each moving average.
SMOOTHING = 0.2
# Plain steps run to measure a bucket's plain time: the first cannot run ahead (it follows a
# drafted step or none), the rest are timed.
PLAIN_PROBE_STEPS = 4
# Drafted steps in a bucket after which its plain time is measured again.
REPROBE_AFTER = 512


def bucket(batch_size: int) -> int:
    """The batch-size bucket: the smallest power of two that holds ``batch_size``."""
    return 1 << max(0, batch_size - 1).bit_length()


class StepCosts:
    """Seconds per plain and per drafted decode step, by batch-size bucket."""

    def __init__(self, async_scheduling: bool) -> None:
        self.async_scheduling = async_scheduling
        self.plain: dict[int, float] = {}
        self.drafted: dict[int, float] = {}
        self._probing: dict[int, int] = {}  # bucket -> plain steps still to run
        self._drafted_since_probe: dict[int, int] = {}  # buckets probed at least once
        self._last: tuple[int, bool] | None = None  # (bucket, drafted) of the last timed step

    def record(self, batch_size: int, drafted: bool, ran_ahead: bool, seconds: float) -> None:
        """A step of ``batch_size`` sequences, one known token each, took ``seconds``;
        ``ran_ahead``: it was launched before the step before it was read."""
        b = bucket(batch_size)
        key = (b, drafted)
        if drafted:
            if self._last == key:
                _update(self.drafted, b, seconds)
            if b in self._drafted_since_probe:
                self._drafted_since_probe[b] += 1
        else:
            if ran_ahead if self.async_scheduling else self._last == key:
                _update(self.plain, b, seconds)
            if self._probing.get(b):
                self._probing[b] -= 1
        self._last = key

    def interrupt(self, batch_size: int) -> None:
        """A step of ``batch_size`` sequences with prompt tokens: it ends the run of like steps,
        and counts as one of a probe's plain steps, so that a load that never leaves prompt
        tokens out of its steps ends the probe (without a plain time: every request drafts)."""
        self._last = None
        b = bucket(batch_size)
        if self._probing.get(b):
            self._probing[b] -= 1

    def wants_plain(self, batch_size: int) -> bool:
        """Whether the next step at ``batch_size`` should run plain to measure the plain time:
        while a probe lasts, and to start one in a bucket never probed or probed
        ``REPROBE_AFTER`` drafted steps ago."""
        b = bucket(batch_size)
        if self._probing.get(b):
            return True
        seen = b in self._drafted_since_probe
        if seen and self._drafted_since_probe[b] < REPROBE_AFTER:
            return False
        self._probing[b] = PLAIN_PROBE_STEPS
        self._drafted_since_probe[b] = 0
        return True

    def break_even(self, batch_size: int) -> float | None:
        """Tokens per drafted step at which drafting pays at ``batch_size``: drafted seconds over
        plain seconds; None until both are measured."""
        b = bucket(batch_size)
        if b not in self.plain or b not in self.drafted:
            return None
        return self.drafted[b] / self.plain[b]


def _update(table: dict[int, float], key: int, seconds: float) -> None:
    old = table.get(key)
    table[key] = seconds if old is None else old + SMOOTHING * (seconds - old)
