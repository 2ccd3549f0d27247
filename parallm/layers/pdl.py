"""Programmatic dependent launch (PDL, Hopper and later) for the decode step's Triton kernels.

A batch-1 decode step of a 1B model is ~170 kernels, and the CUDA-graph timeline shows the GPU
idle for about a microsecond at each boundary while the next grid launches. A kernel launched
with PDL is scheduled while its predecessor is still running and waits for the predecessor's
results in its first instruction (``griddepcontrol.wait``), so the launch overlaps the
predecessor's tail. Every kernel here calls :func:`wait_for_producer` before touching memory,
so launching it this way is always safe; it is a scheduling hint, not a change of results.

``PARALLM_PDL=0`` turns it off (for A/B measurements); it is also off without a Triton that
supports it, on pre-Hopper GPUs and under the Triton interpreter.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

try:
    from triton.backends.nvidia.compiler import CUDAOptions
    from triton.language.extra.cuda import gdc_wait

    _SUPPORTED = "launch_pdl" in CUDAOptions.__dataclass_fields__
except ImportError:  # an older triton, or one without the NVIDIA backend
    _SUPPORTED = False

ENABLED = os.environ.get("PARALLM_PDL", "1") != "0"


if _SUPPORTED:

    @triton.jit
    def wait_for_producer():
        """Block until the previous kernel in the stream has finished and its writes are
        visible (a no-op when the kernel was launched without PDL)."""
        gdc_wait()

else:

    @triton.jit
    def wait_for_producer():
        pass


@functools.cache
def _device_supports(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_launch(tensor: torch.Tensor) -> dict[str, bool]:
    """Keyword arguments for a Triton launch on ``tensor``'s device: ``PDL`` (the kernels'
    constexpr) and, when on, ``launch_pdl``."""
    on = (
        ENABLED
        and _SUPPORTED
        and tensor.is_cuda
        and os.environ.get("TRITON_INTERPRET") != "1"
        and _device_supports(tensor.device.index or 0)
    )
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


__all__ = ["ENABLED", "pdl_launch", "wait_for_producer"]
