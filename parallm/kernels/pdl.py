"""Programmatic dependent launch (PDL, Hopper and later) for chains of small kernels.

A kernel launched with PDL is scheduled while its predecessor drains: it lets its own
successor launch, may issue loads that do not depend on the predecessor (weights), and only
then waits (``griddepcontrol.wait``) for the predecessor's results.

Rules every PDL kernel here keeps: it reads nothing a predecessor writes and writes nothing
before :func:`wait_for_producer`, so results never change with PDL on or off. No cuBLAS call
may sit inside a PDL chain: a CUDA-graph capture failed inside cuBLAS when one did.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:
    from triton.backends.nvidia.compiler import CUDAOptions
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    _SUPPORTED = "launch_pdl" in CUDAOptions.__dataclass_fields__
except ImportError:  # an older triton, or one without the NVIDIA backend
    _SUPPORTED = False


if _SUPPORTED:

    @triton.jit
    def wait_for_producer(PDL: tl.constexpr):
        """Let the next kernel launch, then block until the previous kernel has finished and
        its writes are visible (a no-op when launched without PDL)."""
        if PDL:
            gdc_launch_dependents()
            gdc_wait()

else:

    @triton.jit
    def wait_for_producer(PDL: tl.constexpr):
        pass


@functools.cache
def _device_supports(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_supported(tensor: torch.Tensor) -> bool:
    """Whether kernels on ``tensor``'s device can launch with PDL."""
    return (
        _SUPPORTED
        and tensor.is_cuda
        and os.environ.get("TRITON_INTERPRET") != "1"
        and _device_supports(tensor.device.index or 0)
    )


def pdl_launch(tensor: torch.Tensor, pdl: bool) -> dict[str, int | bool]:
    """Keyword arguments for a Triton launch on ``tensor``'s device: the kernels' ``PDL``
    constexpr and, when on, ``launch_pdl``."""
    if pdl and pdl_supported(tensor):
        return {"PDL": 1, "launch_pdl": True}
    return {"PDL": 0}
