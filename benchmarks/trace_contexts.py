"""Decode contexts drawn from the Azure LLM inference trace, for the benches that time decode
steps on a serving batch's mix of contexts rather than one shared length.

A serving batch at the 8B's x4 load holds rows from tens of tokens to 3,500 (twenty-sixth
session): the shape that decode attention's waves and a decode step's cost depend on, and
that a bench at one context cannot build. No torch here: the CPU model imports it too.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

TRACE = Path(".peers/data/AzureLLMInferenceTrace_conv.csv")
MAX_PROMPT = 3500  # the serving runs' cap on a trace request's prompt (run_vllm.py)


def trace_requests(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The trace's prompt (capped) and output lengths, in its order."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    prompts = np.minimum([int(r["ContextTokens"]) for r in rows], MAX_PROMPT)
    return prompts, np.array([int(r["GeneratedTokens"]) for r in rows])


def draw_contexts(prompts: np.ndarray, outputs: np.ndarray, batch: int,
                  rng: np.random.Generator) -> list[int]:  # fmt: skip
    """``batch`` consecutive requests of the trace from a random start, each part way through
    its output."""
    start = int(rng.integers(0, len(prompts) - batch))
    done = rng.random(batch) * outputs[start : start + batch]
    return [max(1, int(c)) for c in prompts[start : start + batch] + done]
