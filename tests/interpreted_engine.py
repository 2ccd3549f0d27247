"""Helpers of the engine checks that run under the Triton interpreter in a subprocess
(TRITON_INTERPRET must be set before triton is first imported): starting such a script, and,
inside it, sending batch-1 rows through the one-row kernel chain and comparing runs.
(No tests here.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

_TESTS = Path(__file__).resolve().parent


def run_interpreted(script: str, *args: str, timeout: float = 300) -> str:
    """Run ``python -c script args`` under TRITON_INTERPRET=1 with parallm and these helpers
    importable; fails the calling test unless it exits 0. Returns its stdout."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    paths = [str(_TESTS.parent), str(_TESTS), env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                         env=env, timeout=timeout)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def use_one_row_chain(runner: Any) -> list[int]:
    """Compute ``runner``'s batch-1 rows with the one-row kernel chain (what the batch-1 CUDA
    graph captures); other batches keep its forward. The returned list grows by one a row."""
    import torch

    from parallm.engine.one_row_step import OneRowStep

    step, plain = OneRowStep(runner.model, runner.backend), runner.forward_logits
    rows: list[int] = []

    def forward_logits(inputs, device_ids=None):
        if len(inputs.input_ids) != 1:
            return plain(inputs, device_ids)
        rows.append(1)
        ids, positions = (torch.from_numpy(a) for a in (inputs.input_ids, inputs.positions))
        return step.logits(ids, positions, runner._build_metadata(inputs), runner.kv_caches)

    runner.forward_logits = forward_logits
    return rows


def assert_same_tokens_and_logprobs(want: list, got: list) -> None:
    """Each request's first sample in ``got`` has ``want``'s tokens and their logprobs (within
    1e-4: the kernels sum in another order)."""
    for a, b in zip(want, got, strict=True):
        x, y = a.outputs[0], b.outputs[0]
        assert x.token_ids == y.token_ids, (x.token_ids, y.token_ids)
        for t, lx, ly in zip(x.token_ids, x.logprobs, y.logprobs, strict=True):
            assert abs(lx[t].logprob - ly[t].logprob) < 1e-4
