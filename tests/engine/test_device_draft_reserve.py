"""The KV plan keeps the device drafter's copy of the ring (and a datastore's base and index)
out of the cache's share only where that drafter can come on: greedy prompt lookup under async
scheduling with CUDA graphs. Under enforce_eager, without async scheduling, on the CPU or for
another method, the copy is never made, so its bytes stay with the cache."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from parallm.config import SchedulerConfig
from parallm.engine.engine import LLMEngine
from parallm.engine.spec.config import SpeculativeConfig

RING_BYTES = 123_456_789


def _planned_reserve(method: str = "ngram", *, device: str = "cuda", eager: bool = False,
                     async_scheduling: bool = True) -> int:  # fmt: skip
    """The ``reserve_bytes`` that ``_plan_num_blocks`` hands the runner's plan."""
    seen = []

    def plan(tokens, seqs, max_model_len, reserve):
        seen.append(reserve)
        return 10_000

    extra = {"num_layers": 1} if method == "layer_skip" else {}
    spec = SpeculativeConfig.from_value({"method": method, "num_speculative_tokens": 4, **extra})
    history = SimpleNamespace(device_bytes=lambda: RING_BYTES)
    engine = object.__new__(LLMEngine)
    engine.drafter = SimpleNamespace(config=spec, history=history)
    engine.async_scheduling = async_scheduling
    engine.device = torch.device(device)
    engine.config = SimpleNamespace(enforce_eager=eager, cuda_graph_sizes=[1, 2, 4])
    engine.runner = SimpleNamespace(plan_num_blocks=plan)
    engine.executor = engine.draft_model = None
    engine.max_model_len = 256
    engine._plan_num_blocks(16, SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=512))
    assert len(seen) == 1
    return seen[0]


def test_the_ring_is_reserved_where_the_device_drafter_can_come_on():
    assert _planned_reserve() == RING_BYTES


@pytest.mark.parametrize(
    "where",
    [
        {"eager": True},
        {"async_scheduling": False},
        {"device": "cpu"},
        {"method": "layer_skip"},
    ],
    ids=["enforce_eager", "sync", "cpu", "other_method"],
)
def test_nothing_is_reserved_where_it_never_comes_on(where):
    assert _planned_reserve(**where) == 0
