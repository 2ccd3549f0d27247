"""An engine factory for the engine-core process whose process-wide state takes long to free
at interpreter exit, as a GPU engine's does (its CUDA graphs, kernels and KV cache, torch's
CUDA context): the shutdown tests check that a stopped core does not wait for that.
(No tests here; a module of its own so that the spawned core can import the factory.)"""

from __future__ import annotations

import time
from typing import Any


class _SlowToTearDown:
    def __del__(self, sleep=time.sleep) -> None:  # bound now: modules are gone by then
        sleep(60)


_PROCESS_STATE: list[_SlowToTearDown] = []


def engine_with_slow_teardown(**engine_kwargs: Any) -> Any:
    """``LLM(**engine_kwargs).engine``, plus state freed only when the interpreter tears its
    modules down."""
    from parallm.llm import LLM

    _PROCESS_STATE.append(_SlowToTearDown())
    return LLM(**engine_kwargs).engine
