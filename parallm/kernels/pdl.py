"""Programmatic dependent launch (PDL, Hopper and later) for the batch-1 decode layer.

A batch-1 decode step of a 1B model is ~100 small kernels, most of them GEMVs that stream
8-67 MB of weights. Each one loses microseconds at its start (the grid launches, then its
first loads wait a full memory latency) and at its tail (the last wave drains while most SMs
idle). Those weights never depend on the previous kernel, so a GEMV launched with PDL starts
while its predecessor is still draining, issues the loads of its first weight tile, and only
then waits (``griddepcontrol.wait``) for the predecessor's results; every kernel in the chain
calls ``launch_dependents`` as soon as it starts, so its successor is scheduled onto the SMs
its own last wave frees. This is the overlap a persistent megakernel gets, without one.

Rules every PDL kernel here keeps: it reads nothing a predecessor writes and writes nothing
before ``wait_for_producer`` (weights are read-only during decode), so results never change.

Launches use PDL only inside :func:`dependent_launches` (the one-row decode layer opens it,
and the runner around the final norm, LM head and argmax when the model
``chains_one_row``; batched steps and prefill launch as before) and only where supported: a Triton with
``launch_pdl``, a Hopper or newer GPU, not the interpreter. ``PARALLM_PDL=0`` turns it off for
A/B measurements. No cuBLAS call runs inside the scope: when PDL covered kernels around cuBLAS
GEMMs (95f2619), a later CUDA-graph capture failed inside cuBLAS.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

try:
    from triton.backends.nvidia.compiler import CUDAOptions
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    _SUPPORTED = "launch_pdl" in CUDAOptions.__dataclass_fields__
except ImportError:  # an older triton, or one without the NVIDIA backend
    _SUPPORTED = False

ENABLED = os.environ.get("PARALLM_PDL", "1") != "0"
# Where a kernel lets its successor launch (the ``PDL`` constexpr; 0 is off). ``early``: first
# thing, so the successor's CTAs take whatever SM slots free up; ``late``: after the kernel's
# main loop, so the successor lands on an almost idle GPU (balanced over the SMs) and overlaps
# only the tail and its own launch; ``none``: at exit (launch latency only). With the 8 x 1024
# GEMV tiles, early measured fastest on the H100 (1B batch-1 step 1.117 ms against 1.130 none
# and 1.144 late; GEMV chain 805 against 838 us without PDL; benchmarks/RESULTS.md).
TRIGGERS = {"early": 1, "late": 2, "none": 3}
TRIGGER = os.environ.get("PARALLM_PDL_TRIGGER", "early")
if TRIGGER not in TRIGGERS:
    raise ValueError(f"PARALLM_PDL_TRIGGER must be one of {list(TRIGGERS)}, got {TRIGGER!r}")
_active = False


if _SUPPORTED:

    @triton.jit
    def wait_for_producer(PDL: tl.constexpr):
        """Block until the previous kernel has finished and its writes are visible (a no-op
        when launched without PDL); with the ``early`` trigger, let the next one launch first."""
        if PDL == 1:
            gdc_launch_dependents()
        if PDL != 0:
            gdc_wait()

    @triton.jit
    def release_dependents(PDL: tl.constexpr):
        """The ``late`` trigger: call after the kernel's main loop."""
        if PDL == 2:
            gdc_launch_dependents()

    @triton.jit
    def start_small_kernel(PDL: tl.constexpr):
        """For kernels of a few CTAs (rotary, decode attention at batch 1): trigger at once
        unless the trigger is ``none`` (the successor has the rest of the GPU), then wait."""
        if PDL == 1 or PDL == 2:
            gdc_launch_dependents()
        if PDL != 0:
            gdc_wait()

else:

    @triton.jit
    def wait_for_producer(PDL: tl.constexpr):
        pass

    @triton.jit
    def release_dependents(PDL: tl.constexpr):
        pass

    @triton.jit
    def start_small_kernel(PDL: tl.constexpr):
        pass


@contextlib.contextmanager
def dependent_launches(on: bool = True) -> Iterator[None]:
    """Kernels launched in this block (through :func:`pdl_launch`) may use PDL."""
    global _active
    before, _active = _active, on
    try:
        yield
    finally:
        _active = before


@functools.cache
def _device_supports(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_launch(tensor: torch.Tensor) -> dict[str, int | bool]:
    """Keyword arguments for a Triton launch on ``tensor``'s device: ``PDL`` (the kernels'
    constexpr: 0 off, else the trigger's code in ``TRIGGERS``) and, when on, ``launch_pdl``."""
    on = (
        _active
        and ENABLED
        and _SUPPORTED
        and tensor.is_cuda
        and os.environ.get("TRITON_INTERPRET") != "1"
        and _device_supports(tensor.device.index or 0)
    )
    return {"PDL": TRIGGERS[TRIGGER], "launch_pdl": True} if on else {"PDL": 0}


__all__ = [
    "ENABLED",
    "TRIGGER",
    "dependent_launches",
    "pdl_launch",
    "release_dependents",
    "start_small_kernel",
    "wait_for_producer",
]
